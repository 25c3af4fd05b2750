"""HostStore: chunks' KV kept in one node's host (CPU) memory, outside every worker's pool,
so that it outlives the worker that evicted it and any worker can load it without a
recompute.

A plain class, wrapped by `ray.remote` at the end; one runs on each node. It keeps its own
copy of each chunk's arrays (the object a worker offloads is owned by that worker, and goes
when it dies). What it keeps is the TierManager's decision, within the node's budget.
"""

from __future__ import annotations

import secrets

import numpy as np
import ray

from kvchunks.actors.kv_transfer import KVPayload


class HostStore:
    def __init__(self) -> None:
        self.kv: dict[str, KVPayload] = {}
        # New at every start: a store Ray restarted has lost what it held, and the manager,
        # which counts that in the node's budget, learns of it from the next `put`.
        self.incarnation = secrets.token_hex(8)

    def ready(self) -> bool:
        return True

    def started_as(self) -> str:
        return self.incarnation

    def put(self, chunk_hash: str, payload: KVPayload) -> str:
        """Keep a copy of the payload; returns this store's incarnation."""
        if chunk_hash not in self.kv:
            own = KVPayload(
                np.array(payload.k, copy=True), np.array(payload.v, copy=True), payload.dtype
            )
            self.kv[chunk_hash] = own
        return self.incarnation

    def get(self, chunk_hash: str) -> KVPayload | None:
        return self.kv.get(chunk_hash)

    def sizes(self) -> dict[str, int]:
        """hash -> bytes of each chunk kept here."""
        return {h: p.nbytes for h, p in self.kv.items()}

    def drop(self, chunk_hash: str) -> bool:
        return self.kv.pop(chunk_hash, None) is not None


HostStoreActor = ray.remote(HostStore)
