"""Least-recently-used order of chunks, for moving cold KV down a tier."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator


class LRU:
    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def touch(self, chunk_hash: str) -> None:
        """Mark a chunk as just used."""
        self._order[chunk_hash] = None
        self._order.move_to_end(chunk_hash)

    def forget(self, chunk_hash: str) -> None:
        self._order.pop(chunk_hash, None)

    def coldest(self, among: Iterable[str], keep: Callable[[str], bool]) -> Iterator[str]:
        """Chunks of `among`, least recently used first, skipping those `keep` protects."""
        present = set(among)
        unseen = [h for h in present if h not in self._order]  # never touched: coldest of all
        for chunk_hash in [*sorted(unseen), *self._order]:
            if chunk_hash in present and not keep(chunk_hash):
                yield chunk_hash
