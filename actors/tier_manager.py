"""TierManager: moves chunks' KV between workers' pools, the HostStore and the DiskStore.

KV travels as KVPayload objects through Ray's object store. The manager only decides where
a copy comes from and hands back the object ref; the bytes go from the source straight to
whoever asked, never through this actor.
"""

from __future__ import annotations

from collections import Counter

import ray

from kvchunks.actors.remote import DISK_STORE, HOST_STORE, NAMESPACE, REGISTRY, get


@ray.remote
class TierManager:
    def __init__(self):
        self.registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self.host = ray.get_actor(HOST_STORE, namespace=NAMESPACE)
        self.disk = ray.get_actor(DISK_STORE, namespace=NAMESPACE)
        self.disk_node = get(self.disk.ready.remote())
        self.workers: dict[str, ray.actor.ActorHandle] = {}
        self.stats: Counter[str] = Counter()

    def ready(self) -> bool:
        return True

    def connect_workers(self, names: list[str]) -> None:
        """Look the workers up now: the first lookup imports their class (torch, the engine),
        which should not land on the first transfer."""
        for name in names:
            self._worker(name)

    def fetch(self, chunk_hash: str, requester: str, node: str, spec: dict) -> ray.ObjectRef | None:
        """A ref to the chunk's KV from the cheapest place other than the requester's own pool:
        a peer's pool, then host memory, then the DiskStore when the requester is on another
        node (on its own node the requester reads the file itself). None: nowhere."""
        for name in get(self.registry.holders.remote(chunk_hash)):
            if name != requester:
                self.stats["from_worker"] += 1
                return self._worker(name).read_kv.remote(chunk_hash)
        if get(self.host.contains.remote(chunk_hash)):
            self.stats["from_host"] += 1
            return self.host.get.remote(chunk_hash)
        if node != self.disk_node and get(self.disk.contains.remote(chunk_hash)):
            self.stats["from_disk"] += 1
            return self.disk.get.remote(
                chunk_hash, spec["fingerprint"], spec["dtype"], spec["shape"]
            )
        return None

    def offload(self, chunk_hash: str) -> bool:
        """Copy the chunk's KV from a worker holding it into host memory."""
        holders = get(self.registry.holders.remote(chunk_hash))
        if not holders:
            return get(self.host.contains.remote(chunk_hash))
        self.stats["offloaded"] += 1
        return get(
            self.host.put.remote(chunk_hash, self._worker(holders[0]).read_kv.remote(chunk_hash))
        )

    def archive(self, chunk_hash: str) -> bool:
        """Write the chunk's KV file on the DiskStore's node from host memory or a worker."""
        holders = get(self.registry.holders.remote(chunk_hash))
        if get(self.host.contains.remote(chunk_hash)):
            payload = self.host.get.remote(chunk_hash)
        elif holders:
            payload = self._worker(holders[0]).read_kv.remote(chunk_hash)
        else:
            return get(self.disk.contains.remote(chunk_hash))
        record = get(self.registry.call.remote("get", chunk_hash)).to_record()
        record |= {"segments": [], "is_active": False}
        info = get(self._worker(get(self.registry.list_workers.remote())[0]).info.remote())
        self.stats["archived"] += 1
        return get(self.disk.put.remote(chunk_hash, payload, record, info["fingerprint"]))

    def transfers(self) -> dict[str, int]:
        return dict(self.stats)

    def _worker(self, name: str) -> ray.actor.ActorHandle:
        if name not in self.workers:
            self.workers[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self.workers[name]
