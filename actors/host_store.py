"""HostStore: chunks' KV kept in host (CPU) memory, outside every worker's pool.

It holds KVPayloads as Ray delivered them: their arrays stay in the object store's shared
memory, so a worker on this node reads them back without a copy.
"""

from __future__ import annotations

import ray

from kvchunks.actors.kv_transfer import KVPayload


@ray.remote
class HostStore:
    def __init__(self):
        self.kv: dict[str, KVPayload] = {}

    def ready(self) -> bool:
        return True

    def put(self, chunk_hash: str, payload: KVPayload | None) -> bool:
        if payload is None:
            return False
        self.kv[chunk_hash] = payload
        return True

    def get(self, chunk_hash: str) -> KVPayload | None:
        return self.kv.get(chunk_hash)

    def contains(self, chunk_hash: str) -> bool:
        return chunk_hash in self.kv

    def drop(self, chunk_hash: str) -> bool:
        return self.kv.pop(chunk_hash, None) is not None

    def usage(self) -> dict:
        return {"chunks": len(self.kv), "bytes": sum(p.nbytes for p in self.kv.values())}
