"""Answers streamed out of a worker as their text comes, each of which its caller can stop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from kvchunks.common import ListenerGone

Result = TypeVar("Result")
OnText = Callable[[str], None]


class AnswerStreams:
    def __init__(self):
        self.running: dict[str, threading.Event] = {}  # answer id -> set to stop it

    def stream(self, answer_id: str, answer: Callable[[OnText], Result]) -> Iterator[str | Result]:
        """Run answer(on_text) on a thread of its own; yield each piece of text as it comes,
        then the result (or raise what the answer raised)."""
        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}
        self.running[answer_id] = stopped = threading.Event()

        def on_text(piece: str) -> None:
            if stopped.is_set():
                raise ListenerGone(f"answer {answer_id} stopped: its caller went away")
            pieces.put(piece)

        def run() -> None:
            try:
                outcome["result"] = answer(on_text)
            except BaseException as e:  # handed to the caller below, as raised
                outcome["error"] = e
            finally:
                pieces.put(None)
                self.running.pop(answer_id, None)

        threading.Thread(target=run, name="kvchunks-answer", daemon=True).start()
        while (piece := pieces.get()) is not None:
            yield piece
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"]

    def stop(self, answer_id: str) -> None:
        """The answer ends at its next piece of text, and nothing of it is kept."""
        if (stopped := self.running.get(answer_id)) is not None:
            stopped.set()
