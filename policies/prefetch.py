"""Which chunks to bring into the pool ahead of use, when a chunk is activated.

A policy only names candidates; the tier machinery decides whether there is room and does
the transfer in the background.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Protocol

from kvchunks.common import InvalidInput
from kvchunks.store.chunk import ChunkInfo

POLICY_ENV = "KVCHUNKS_PREFETCH_POLICY"


class Provenance(Protocol):
    """What a policy reads of the registry: the chunks computed after a chunk."""

    def children(self, chunk_hash: str) -> list[str]: ...


class PrefetchPolicy(Protocol):
    def on_activate(self, chunk: ChunkInfo, active: list[str]) -> list[str]:
        """Hashes worth having in the pool soon, given that `chunk` was just activated."""
        ...


class Explicit:
    """Nothing is fetched ahead unless asked for with `prefetch(hash)`."""

    def on_activate(self, chunk: ChunkInfo, active: list[str]) -> list[str]:
        return []


class ProvenanceNeighbours:
    """The parents and children of an activated chunk: the conversation around it."""

    def __init__(self, registry: Provenance, limit: int = 8):
        self.registry = registry
        self.limit = limit

    def on_activate(self, chunk: ChunkInfo, active: list[str]) -> list[str]:
        # The parents are in the record (a deleted one is skipped by the transfer): one read.
        near = [*chunk.parent_chunks, *self.registry.children(chunk.hash)]
        return [h for h in dict.fromkeys(near) if h not in active][: self.limit]


class CoActivation:
    """Chunks that were often active together with the activated one."""

    def __init__(self, min_count: int = 2, limit: int = 8):
        self.together: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.min_count = min_count
        self.limit = limit

    def on_activate(self, chunk: ChunkInfo, active: list[str]) -> list[str]:
        for other in active:
            if other != chunk.hash:
                self.together[chunk.hash][other] += 1
                self.together[other][chunk.hash] += 1
        common = self.together[chunk.hash].most_common()
        picks = [h for h, n in common if n >= self.min_count and h not in active]
        return picks[: self.limit]


def make_policy(name: str | None, registry: Provenance) -> PrefetchPolicy:
    """The policy called `name`; None: the one KVCHUNKS_PREFETCH_POLICY names, else
    provenance neighbours."""
    policies = {
        "explicit": Explicit,
        "provenance": lambda: ProvenanceNeighbours(registry),
        "coactivation": CoActivation,
    }
    chosen = name if name is not None else os.environ.get(POLICY_ENV, "provenance")
    if chosen not in policies:
        where = "" if name is not None else f" in {POLICY_ENV}"
        raise InvalidInput(
            f"unknown prefetch policy {chosen!r}{where}; use one of {', '.join(policies)}"
        )
    return policies[chosen]()
