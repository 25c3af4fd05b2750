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


class LRUBudget:
    """Which chunks a tier keeps within `budget_bytes`, least recently used out first.

    It only decides: the caller moves the bytes and drops the victims it names."""

    def __init__(self, budget_bytes: int | None, sizes: dict[str, int] | None = None):
        self.budget_bytes = budget_bytes  # None: no limit
        self.sizes: dict[str, int] = dict(sizes or {})  # hash -> bytes kept
        self.lru = LRU()

    def used_bytes(self) -> int:
        return sum(self.sizes.values())

    def fits(self, nbytes: int) -> bool:
        return self.budget_bytes is None or self.used_bytes() + nbytes <= self.budget_bytes

    def admit(self, chunk_hash: str, nbytes: int) -> list[str] | None:
        """Count the chunk as kept, and return the chunks to drop so that it fits (coldest
        first); None, counting nothing, if it cannot fit even alone."""
        if chunk_hash in self.sizes:
            self.lru.touch(chunk_hash)
            return []
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            return None
        victims = []
        for victim in self.lru.coldest(list(self.sizes), lambda h: False):
            if self.fits(nbytes):
                break
            victims.append(victim)
            self.forget(victim)
        self.sizes[chunk_hash] = nbytes
        self.lru.touch(chunk_hash)
        return victims

    def touch(self, chunk_hash: str) -> None:
        if chunk_hash in self.sizes:
            self.lru.touch(chunk_hash)

    def forget(self, chunk_hash: str) -> bool:
        self.lru.forget(chunk_hash)
        return self.sizes.pop(chunk_hash, None) is not None
