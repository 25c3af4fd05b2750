"""A generation run on a thread, its text handed to the event loop as it comes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from kvchunks.common import KVChunksError, ListenerGone

# The generation waits (at most this long) until its first piece has been sent before it
# computes the next: on a machine with few cores the next step's compute would otherwise
# hold back the event loop that sends it, and the first token is what a user waits for.
FIRST_PIECE_WAIT = 0.05

# Until the first piece comes (a long prefill), whether the client is still there is asked
# this often: one that left stops the generation within a layer of the model. (After it,
# each piece is a chance to see the client gone.)
CLIENT_POLL_S = 0.1


class StoppedBeforeAnswer(KVChunksError):
    """A request stopped by its client (POST /v1/requests/{id}/stop) before the answer's
    first token: as a Ctrl-C then, nothing is kept."""


class RequestIdInUse(KVChunksError):
    """A new request named as one still running."""


class NoSuchRequest(KVChunksError):
    """A stop for a name no running request has."""


async def stream_call(
    fn: Callable[..., Any],
    slots: asyncio.Semaphore,
    client_gone: Callable[[], Awaitable[bool]],
    stop: threading.Event | None = None,
    **kwargs,
) -> AsyncGenerator[tuple[str, Any], None]:
    """Run fn(**kwargs, on_text=..., check_stop=...) on a thread; yield ("text", piece) as
    they come, then ("result", value) or ("error", exception). Nothing, and fn is not run,
    when the client went away while the call waited for its slot.

    The call holds one of `slots` until its thread ends, not until its caller stops
    listening: a generation whose client went away still holds KV until it has stopped. It
    is told to stop when the caller stops listening or the client is seen gone (its
    check_stop, between layers, or its next piece raises ListenerGone), and nothing of it
    is kept. Once `stop` is set it stops as a Ctrl-C stops it: the answer so far is kept
    and is the result, marked interrupted (StoppedBeforeAnswer before its first token)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone, first_sent = threading.Event(), threading.Event()

    def put(item: tuple[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def check_stop() -> None:
        if stop is not None and stop.is_set():  # asked for: the client still listens
            raise KeyboardInterrupt
        if gone.is_set():
            raise ListenerGone("the client stopped listening")

    def on_text(piece: str) -> None:
        check_stop()
        put(("text", piece))
        if not first_sent.is_set():  # see FIRST_PIECE_WAIT
            first_sent.wait(FIRST_PIECE_WAIT)

    def work() -> None:
        try:
            put(("result", fn(**kwargs, on_text=on_text, check_stop=check_stop)))
        except KeyboardInterrupt:  # only check_stop raises it here: `stop`, before any token
            put(("error", StoppedBeforeAnswer("stopped before the first token: nothing was kept")))
        except BaseException as e:  # handed to the caller, as raised
            put(("error", e))
        finally:
            with contextlib.suppress(RuntimeError):  # the server's loop has already closed
                loop.call_soon_threadsafe(slots.release)

    await slots.acquire()
    try:
        left = await client_gone()
    except BaseException:  # cancelled (the server stopping): the slot is not used
        slots.release()
        raise
    if left:  # a prompt computed for nobody would hold up those still here
        slots.release()
        return
    threading.Thread(target=work, name="kvchunks-http-generation", daemon=True).start()
    try:
        first = await _first_event(queue, client_gone)
        if first is None:
            return
        kind, value = first
        while True:
            yield kind, value
            first_sent.set()  # the caller asks for more once it has sent what it had
            if kind != "text":
                return
            kind, value = await queue.get()
    finally:
        gone.set()
        first_sent.set()  # its next piece raises ListenerGone: no need to wait


async def _first_event(
    queue: asyncio.Queue, client_gone: Callable[[], Awaitable[bool]]
) -> tuple[str, Any] | None:
    """The generation's first event, or None once its client is seen gone."""
    getting = asyncio.ensure_future(queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({getting}, timeout=CLIENT_POLL_S)
            if done:
                return getting.result()
            if await client_gone():
                return None
    finally:
        getting.cancel()  # when done, a no-op


class RunningRequests:
    """The generation requests that a client named (`request_id`) while they run, so that it
    can stop one and still read what was kept (POST /v1/requests/{id}/stop). Used on the
    event loop only."""

    def __init__(self):
        self._stops: dict[str, threading.Event] = {}

    def start(self, request_id: str) -> threading.Event:
        """The stop of a new request; a name in use by a running one is refused."""
        if request_id in self._stops:
            raise RequestIdInUse(f"request_id {request_id!r} names a request still running")
        stop = self._stops[request_id] = threading.Event()
        return stop

    async def until_closed(
        self, request_id: str, events: AsyncGenerator[tuple[str, Any], None]
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """`events`, the request named while they are read; closed, the name is free again."""
        try:
            async for event in events:
                yield event
        finally:
            del self._stops[request_id]
            await events.aclose()

    def stop(self, request_id: str) -> None:
        if request_id not in self._stops:
            raise NoSuchRequest(f"no running request has request_id {request_id!r}")
        self._stops[request_id].set()
