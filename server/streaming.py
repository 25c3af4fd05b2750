"""A generation run on a thread, its text handed to the event loop as it comes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from kvchunks.common import ListenerGone

# The generation waits (at most this long) until its first piece has been sent before it
# computes the next: on a machine with few cores the next step's compute would otherwise
# hold back the event loop that sends it, and the first token is what a user waits for.
FIRST_PIECE_WAIT = 0.05


async def stream_call(
    fn: Callable[..., Any],
    slots: asyncio.Semaphore,
    client_gone: Callable[[], Awaitable[bool]],
    **kwargs,
) -> AsyncIterator[tuple[str, Any]]:
    """Run fn(**kwargs, on_text=...) on a thread; yield ("text", piece) as they come, then
    ("result", value) or ("error", exception). Nothing, and fn is not run, when the client
    went away while the call waited for its slot.

    The call holds one of `slots` until its thread ends, not until its caller stops
    listening: a generation whose client went away still holds KV until it has stopped. It
    is told to stop when the caller stops listening (its next piece raises ListenerGone)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone, first_sent = threading.Event(), threading.Event()

    def put(item: tuple[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def on_text(piece: str) -> None:
        if gone.is_set():
            raise ListenerGone("the client stopped listening")
        put(("text", piece))
        if not first_sent.is_set():  # see FIRST_PIECE_WAIT
            first_sent.wait(FIRST_PIECE_WAIT)

    def work() -> None:
        try:
            put(("result", fn(**kwargs, on_text=on_text)))
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
        while True:
            kind, value = await queue.get()
            yield kind, value
            first_sent.set()  # the caller asks for more once it has sent what it had
            if kind != "text":
                return
    finally:
        gone.set()
        first_sent.set()  # its next piece raises ListenerGone: no need to wait
