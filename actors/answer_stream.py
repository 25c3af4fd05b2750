"""Answers streamed out of a worker as their text comes, each of which its caller can stop."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TypeVar

from kvchunks.common import ListenerGone

Result = TypeVar("Result")
OnText = Callable[[str], None]


# Answers stopped before they started, remembered for when they start; a stop that comes
# after its answer ended is remembered too, so only the latest few are kept.
EARLY_STOPS_KEPT = 1024


class AnswerStreams:
    def __init__(self):
        self.running: dict[str, threading.Event] = {}  # answer id -> set to stop it
        self.keeping: set[str] = set()  # of those stopped, the ones whose answer is kept
        self.stopped_early: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()

    def stream(self, answer_id: str, answer: Callable[[OnText], Result]) -> Iterator[str | Result]:
        """Run answer(on_text) on a thread of its own; yield each piece of text as it comes,
        then the result (or raise what the answer raised)."""
        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}
        with self.lock:
            if answer_id in self.stopped_early:
                del self.stopped_early[answer_id]
                raise ListenerGone(f"answer {answer_id} stopped before it started")
            self.running[answer_id] = stopped = threading.Event()

        def on_text(piece: str) -> None:
            if stopped.is_set() and answer_id in self.keeping:
                raise KeyboardInterrupt  # the caller's Ctrl-C: the generation keeps its part
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
                with self.lock:
                    self.running.pop(answer_id, None)
                    self.keeping.discard(answer_id)

        threading.Thread(target=run, name="kvchunks-answer", daemon=True).start()
        while (piece := pieces.get()) is not None:
            yield piece
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"]

    def stop(self, answer_id: str, keep: bool = False) -> None:
        """The answer ends at its next piece of text, and nothing of it is kept, or with
        `keep` what was computed of it is; one that has not started yet never starts (its
        call may wait behind others)."""
        with self.lock:
            stopped = self.running.get(answer_id)
            if keep and stopped is not None:
                self.keeping.add(answer_id)
            if stopped is None:
                self.stopped_early[answer_id] = None
                while len(self.stopped_early) > EARLY_STOPS_KEPT:
                    self.stopped_early.popitem(last=False)
                return
        stopped.set()
