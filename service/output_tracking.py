"""`with manager.track_output() as t:` collects the output chunks of the generations made
inside it (shared by ContextManager and the Ray Client)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvchunks.store.chunk import ChunkInfo


@dataclass
class OutputTracker:
    """Collects the output chunks of the generations inside `with cm.track_output()`."""

    manager: Any  # a ContextManager or a Client: what it needs is compose_chunks
    chunks: list[ChunkInfo] = field(default_factory=list)

    def get_chunk(self) -> ChunkInfo | None:
        """The tracked output: one chunk, or a composed view when several were generated."""
        if len(self.chunks) <= 1:
            return self.chunks[0] if self.chunks else None
        return self.manager.compose_chunks([c.hash for c in self.chunks])


class OutputTracking:
    """`track_output()`, shared by ContextManager and the Ray Client."""

    _trackers: list[OutputTracker]

    @contextlib.contextmanager
    def track_output(self) -> Iterator[OutputTracker]:
        tracker = OutputTracker(self)  # type: ignore[arg-type]  # it needs compose_chunks
        self._trackers.append(tracker)
        try:
            yield tracker
        finally:
            self._trackers.remove(tracker)
