"""A generation run on a thread, its text handed to the event loop as it comes, and the
hold-back that keeps a stop string out of what is streamed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any


async def stream_call(fn: Callable[..., Any], **kwargs) -> AsyncIterator[tuple[str, Any]]:
    """Run fn(**kwargs, on_text=...) on a thread; yield ("text", piece) as they come, then
    ("result", value) or ("error", exception)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            put(("result", fn(**kwargs, on_text=lambda piece: put(("text", piece)))))
        except BaseException as e:  # handed to the caller, as raised
            put(("error", e))

    threading.Thread(target=work, name="kvchunks-http-generation", daemon=True).start()
    while True:
        kind, value = await queue.get()
        yield kind, value
        if kind != "text":
            return


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The text before the first stop string in it (OpenAI leaves stop strings out)."""
    found = [text.find(s) for s in stops if s in text]
    return text[: min(found)] if found else text


class StopHoldBack:
    """Streams text, holding back the last characters that may start a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        kept = cut_at_stop(self.text, self.stops)
        if len(kept) < len(self.text):
            self.stopped = True
            return self._send(len(kept))
        return self._send(max(len(self.text) - self.hold, self.sent))

    def finish(self) -> str:
        return "" if self.stopped else self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], upto
        return out
