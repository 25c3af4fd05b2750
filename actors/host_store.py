"""HostStore: chunks' KV kept in a node's host (CPU) memory, outside every worker's pool, so
that it outlives the worker that evicted it and any worker can load it without a recompute.

A plain class, wrapped by `ray.remote` at the end. It keeps its own copy of each chunk's
arrays (the object a worker offloads is owned by that worker, and goes when it dies), within
a byte budget, dropping the least recently used first: every chunk also has its file.
"""

from __future__ import annotations

import numpy as np
import ray

from kvchunks.actors.kv_transfer import KVPayload
from kvchunks.policies.budgets import TierBudgets
from kvchunks.policies.lru import LRU


class HostStore:
    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = (
            TierBudgets.from_env().cpu_bytes if budget_bytes is None else budget_bytes
        )
        self.kv: dict[str, KVPayload] = {}
        self.lru = LRU()

    def ready(self) -> bool:
        return True

    def put(self, chunk_hash: str, payload: KVPayload | None) -> bool:
        """Keep a copy of the chunk's KV; False if it cannot fit the budget at all."""
        if payload is None or payload.nbytes > self.budget_bytes:
            return False
        if chunk_hash not in self.kv:
            for victim in self.lru.coldest(list(self.kv), lambda h: False):
                if self.used_bytes() + payload.nbytes <= self.budget_bytes:
                    break
                self.drop(victim)
            own = KVPayload(
                np.array(payload.k, copy=True), np.array(payload.v, copy=True), payload.dtype
            )
            self.kv[chunk_hash] = own
        self.lru.touch(chunk_hash)
        return True

    def get(self, chunk_hash: str) -> KVPayload | None:
        if chunk_hash in self.kv:
            self.lru.touch(chunk_hash)
        return self.kv.get(chunk_hash)

    def contains(self, chunk_hash: str) -> bool:
        return chunk_hash in self.kv

    def hashes(self) -> list[str]:
        return list(self.kv)

    def drop(self, chunk_hash: str) -> bool:
        self.lru.forget(chunk_hash)
        return self.kv.pop(chunk_hash, None) is not None

    def used_bytes(self) -> int:
        return sum(p.nbytes for p in self.kv.values())

    def usage(self) -> dict:
        return {"chunks": len(self.kv), "bytes": self.used_bytes(), "budget": self.budget_bytes}


HostStoreActor = ray.remote(HostStore)
