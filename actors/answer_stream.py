"""Answers streamed out of a worker as their text comes, each of which its caller can stop."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from kvchunks.common import ListenerGone

Result = TypeVar("Result")
OnText = Callable[[str], None]
CheckStop = Callable[[], None]


# Answers stopped before they started, remembered for when they start; a stop that comes
# after its answer ended is remembered too, so only the latest few are kept.
EARLY_STOPS_KEPT = 1024


@dataclass
class Stop:
    """A running answer's stop: set by its caller, who may keep what was computed."""

    answer_id: str
    asked: threading.Event = field(default_factory=threading.Event)
    keep: bool = False

    def check(self) -> None:
        """Raise once asked: KeyboardInterrupt, on which a generation ends keeping what it
        computed (the caller's Ctrl-C), or ListenerGone, which keeps nothing."""
        if self.asked.is_set() and self.keep:
            raise KeyboardInterrupt
        if self.asked.is_set():
            raise ListenerGone(f"answer {self.answer_id} stopped: its caller went away")


class AnswerStreams:
    def __init__(self):
        self.running: dict[str, Stop] = {}  # answer id -> its stop
        self.stopped_early: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()

    def stream(
        self, answer_id: str, answer: Callable[[OnText, CheckStop], Result]
    ) -> Iterator[str | Result]:
        """Run answer(on_text, check_stop) on a thread of its own; yield each piece of text as
        it comes, then the result (or raise what the answer raised)."""
        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}
        with self.lock:
            if answer_id in self.stopped_early:
                del self.stopped_early[answer_id]
                raise ListenerGone(f"answer {answer_id} stopped before it started")
            self.running[answer_id] = stop = Stop(answer_id)

        def on_text(piece: str) -> None:
            stop.check()
            pieces.put(piece)

        def run() -> None:
            try:
                outcome["result"] = answer(on_text, stop.check)
            except KeyboardInterrupt:  # a Ctrl-C before the first token: nothing to keep
                outcome["error"] = ListenerGone(f"answer {answer_id} stopped before its answer")
            except BaseException as e:  # handed to the caller below, as raised
                outcome["error"] = e
            finally:
                pieces.put(None)
                with self.lock:
                    self.running.pop(answer_id, None)

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
            stop = self.running.get(answer_id)
            if stop is None:
                self.stopped_early[answer_id] = None
                while len(self.stopped_early) > EARLY_STOPS_KEPT:
                    self.stopped_early.popitem(last=False)
                return
            stop.keep = stop.keep or keep  # a keep asked once is not taken back
            stop.asked.set()
