"""What a caller sees of a chunk: the view of its record with what only a running process
knows, whether and where its KV is resident (`tier`, `segments`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from kvchunks.engine.kv_segment import KVSegment
from kvchunks.service.catalog import recorded_tiers
from kvchunks.service.pieces import owner_hashes, pieces
from kvchunks.service.tiers import Tiers
from kvchunks.store.chunk import ChunkInfo
from kvchunks.vocabulary import farthest_tier, nearest_tier

# hash -> the nearest tier any worker of a shared pool holds the chunk in
PoolTiers = Callable[[], dict[str, str]]
State = tuple[str, list[KVSegment]]  # a chunk's tier, and its segments in this pool


class ChunkViews:
    def __init__(self, tiers: Tiers, pool_tiers: PoolTiers | None = None):
        self.tiers, self.registry, self.pool_tiers = tiers, tiers.registry, pool_tiers

    def describe(self, chunk: ChunkInfo) -> ChunkInfo:
        return self.describe_many([chunk])[0]

    def describe_many(self, chunks: list[ChunkInfo]) -> list[ChunkInfo]:
        """Each chunk's view with its tier and pool segments; a listing reads its views'
        sources once, not per view. In a shared pool, a chunk's tier is the nearest any
        worker has."""
        if not self.tiers.model.started:  # no pool yet: the tiers recorded, here or before
            latest = self.tiers.records.latest
            states = [(tier, []) for tier in recorded_tiers(self.registry, chunks, latest)]
        else:
            with self.tiers.lock:  # a generation or a prefetch may change the pool meanwhile
                states = [self._pool_state(chunk) for chunk in chunks]
        if self.pool_tiers is not None and any(tier != "gpu" for tier, _ in states):
            pool = self.pool_tiers()
            states = [
                (tier if tier == "gpu" else self._shared_tier(chunk, pool), segments)
                for chunk, (tier, segments) in zip(chunks, states, strict=True)
            ]
        elif self.tiers.model.started and any(tier != "gpu" for tier, _ in states):
            states = self._as_recorded(chunks, states)
        return [
            ChunkInfo.view(chunk, tier, chunk.is_active, segments)
            for chunk, (tier, segments) in zip(chunks, states, strict=True)
        ]

    def _as_recorded(self, chunks: list[ChunkInfo], states: list[State]) -> list[State]:
        """Another process on the same registry may hold KV that this one does not: where
        this pool is not nearer, a chunk's tier is the one recorded (by this process for
        the chunks it moved, else by the process that did), so every process and the
        registry-only commands show the same tier."""
        recorded = recorded_tiers(self.registry, chunks, self.tiers.records.latest)
        return [
            (nearest_tier([tier, elsewhere]), segments)
            for (tier, segments), elsewhere in zip(states, recorded, strict=True)
        ]

    def _shared_tier(self, chunk: ChunkInfo, pool: dict[str, str]) -> str:
        return farthest_tier(
            [
                nearest_tier([self.tiers.tier_of(h), pool.get(h, "disk")])
                for h in owner_hashes(chunk)
            ]
        )

    def _pool_state(self, chunk: ChunkInfo) -> State:
        tiers = self.tiers
        tier = farthest_tier([tiers.tier_of(h) for h in owner_hashes(chunk)])
        if tier != "gpu":
            return tier, []
        if chunk.layout == "view":  # read straight from the pool: a listing is not a use
            llm = tiers.model.llm
            return tier, [
                seg
                for p in pieces(self.registry, chunk)
                for seg in llm.slice(tiers.kv[p.chunk.hash], p.start, p.length)
            ]
        return tier, list(tiers.kv[chunk.hash])

    def stats(self, chunks: list[ChunkInfo]) -> dict:
        """Pool usage, these chunks per tier and how many are active, the store's counters."""
        model = self.tiers.model
        return {
            "pool": model.llm.pool_usage() if model.started else None,
            "tiers": dict(Counter(c.tier for c in chunks)),
            "active": sum(c.is_active for c in chunks),
            "counters": dict(self.tiers.stats),
            "dtype": model.engine_config.dtype,
        }
