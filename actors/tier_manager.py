"""TierManager: where a chunk's KV can be had in the cluster, and where evicted KV goes.

KV travels as KVPayload objects through Ray's object store. The manager only decides where
a copy comes from and hands back the object ref; the bytes go from the source straight to
whoever asked, never through this actor. A plain class, wrapped by `ray.remote` at the end.
"""

from __future__ import annotations

from collections import Counter

import ray

from kvchunks.actors.remote import NAMESPACE, get


class TierManager:
    def __init__(
        self,
        registry: ray.actor.ActorHandle,
        host: ray.actor.ActorHandle,
        disk: ray.actor.ActorHandle,
    ):
        self.registry, self.host, self.disk = registry, host, disk
        self.disk_node = get(disk.ready.remote())
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
        the HostStore (no worker is disturbed), then a peer's pool, then the DiskStore when
        the requester is on another node (on its own node the requester reads the file
        itself). None: nowhere."""
        if get(self.host.contains.remote(chunk_hash)):
            self.stats["from_host"] += 1
            return self.host.get.remote(chunk_hash)
        for name in get(self.registry.holders.remote(chunk_hash)):
            if name != requester:
                self.stats["from_worker"] += 1
                return self._worker(name).read_kv.remote(chunk_hash)
        if node != self.disk_node and get(self.disk.contains.remote(chunk_hash)):
            self.stats["from_disk"] += 1
            return self.disk.get.remote(
                chunk_hash, spec["fingerprint"], spec["dtype"], spec["shape"]
            )
        return None

    def offload(self, chunk_hash: str, payload: list[ray.ObjectRef]) -> bool:
        """Keep KV a worker evicted in host memory (the ref comes wrapped in a list, so that
        it reaches the HostStore unread); False if it does not fit there."""
        kept = get(self.host.put.remote(chunk_hash, payload[0]), "host store")
        self.stats["offloaded" if kept else "offload_refused"] += 1
        return kept

    def transfers(self) -> dict[str, int]:
        return dict(self.stats)

    def _worker(self, name: str) -> ray.actor.ActorHandle:
        if name not in self.workers:
            self.workers[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self.workers[name]


TierManagerActor = ray.remote(TierManager)
