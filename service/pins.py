"""What running work reads: the chunks and compositions whose KV a generation, a recompute or
a new chunk's prefill attends to. Making room in the pool never moves them out, so nothing is
moved out only to be brought back at once."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

from kvchunks.service.pieces import owners
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.registry import ChunkRegistry


class Pins:
    def __init__(self, registry: ChunkRegistry, lock: threading.RLock):
        # The pool's lock: a make-room reads the pins under it, so none changes meanwhile.
        self.registry, self.lock = registry, lock
        self.counts: Counter[str] = Counter()  # key -> how many running works read it

    @contextlib.contextmanager
    def pinning(self, chunks: list[ChunkInfo]) -> Iterator[None]:
        """Keep the KV these chunks read in the pool (no eviction) while the block runs."""
        held = [o.hash for c in chunks for o in owners(self.registry, c)]
        self.pin(held)
        try:
            yield
        finally:
            self.unpin(held)

    def pin(self, keys: list[str]) -> None:
        """Keep these chunks' or compositions' KV in the pool until `unpin`."""
        with self.lock:
            self.counts.update(keys)

    def unpin(self, keys: list[str]) -> None:
        with self.lock:
            self.counts -= Counter(keys)  # drops those at zero: every make-room reads them

    def held(self) -> set[str]:
        return set(self.counts)
