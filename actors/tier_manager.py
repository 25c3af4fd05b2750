"""TierManager: where a chunk's KV can be had in the cluster, where evicted KV goes, what each
node's host memory and disk may hold, and which worker prefetches for an activation.

Each node has a HostStore and a DiskStore (`NodeStores`). The manager keeps their budgets:
a worker's evicted KV goes to its own node's HostStore, least recently used out first; a new
KV file is admitted to its node's disk only within the disk budget (a file is a chunk's only
durable copy of its KV, so a full disk refuses rather than drops one). For a routed
activation whose chunks are not all on the worker that took it, it runs the prefetch policy
and sends the prefetch to the worker the router picks; the other activations prefetch where
they were made, by that worker's policy, with no call here.

KV travels as KVPayload objects through Ray's object store. The manager only decides where a
copy comes from and hands back the object ref; the bytes go from the source straight to
whoever asked, never through this actor. A plain class, wrapped by `ray.remote` at the end.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import ray

from kvchunks.actors.remote import DISK_STORE, HOST_STORE, NAMESPACE, get, store_name
from kvchunks.actors.router import Router
from kvchunks.common import ServiceUnavailable
from kvchunks.policies.budgets import TierBudgets
from kvchunks.policies.lru import LRUBudget
from kvchunks.policies.prefetch import PrefetchPolicy
from kvchunks.service.pieces import owner_hashes
from kvchunks.store.chunk import ChunkInfo

ActorHandle = ray.actor.ActorHandle


@dataclass
class NodeStores:
    host: ActorHandle  # HostStore
    disk: ActorHandle  # DiskStore


class TierManager:
    def __init__(
        self,
        registry: ActorHandle,
        nodes: list[str],  # the nodes whose stores run under their names (see store_name)
        budgets: TierBudgets,
        policy: PrefetchPolicy,
    ):
        # The stores are looked up by name, not passed: Ray keeps the arguments of an actor
        # that hold actor handles inside other objects in its creator's object store, and
        # could not restart this actor once `kvchunks serve` has exited.
        self.registry, self.policy, self.router = registry, policy, Router(registry)
        self.stores = {node: _stores_of(node) for node in nodes}
        # What each store holds is read back, so that a restarted manager keeps the budgets;
        # every store is asked at once, not one after another.
        host_sizes = {node: s.host.sizes.remote() for node, s in self.stores.items()}
        disk_sizes = {node: s.disk.sizes.remote() for node, s in self.stores.items()}
        started = {node: s.host.started_as.remote() for node, s in self.stores.items()}
        self.hosts = {
            node: LRUBudget(budgets.cpu_bytes, get(sizes, "a host store"))
            for node, sizes in host_sizes.items()
        }
        # Each HostStore's incarnation when it was counted (None: unknown, after a failed put).
        self.host_started: dict[str, str | None] = {
            node: get(ref, "a host store") for node, ref in started.items()
        }
        self.disks = {
            node: LRUBudget(budgets.disk_bytes, get(sizes, "a disk store"))
            for node, sizes in disk_sizes.items()
        }
        self.workers: dict[str, ActorHandle] = {}
        self.stats: Counter[str] = Counter()
        self.lock = threading.Lock()  # calls run on several threads; the budgets are shared

    def ready(self) -> bool:
        return True

    def connect_workers(self, names: list[str]) -> None:
        """Look the workers up now: the first lookup imports their class (torch, the engine),
        which should not land on the first transfer."""
        for name in names:
            self._worker(name)

    # -- KV in and out of host memory -------------------------------------------------------

    def fetch(self, chunk_hash: str, requester: str, node: str, spec: dict) -> ray.ObjectRef | None:
        """A ref to the chunk's KV from the cheapest place other than the requester's own pool:
        a HostStore, its own node's first (no worker is disturbed), then a peer's pool, then
        another node's DiskStore (on its own node the requester reads the file itself).
        None: nowhere."""
        with self.lock:
            in_host = [n for n in self._near_first(node) if chunk_hash in self.hosts[n].sizes]
            if in_host:
                self.hosts[in_host[0]].touch(chunk_hash)
        if in_host:
            self.stats["from_host"] += 1
            return self.stores[in_host[0]].host.get.remote(chunk_hash)
        for name in get(self.registry.holders.remote(chunk_hash)):
            if name != requester:
                self.stats["from_worker"] += 1
                return self._worker(name).read_kv.remote(chunk_hash)
        on_disk = [n for n in self.stores if n != node and chunk_hash in self.disks[n].sizes]
        if on_disk:
            self.stats["from_disk"] += 1
            return self.stores[on_disk[0]].disk.get.remote(
                chunk_hash, spec["fingerprint"], spec["dtype"], spec["shape"]
            )
        return None

    def offload(
        self, chunk_hash: str, node: str, payload: list[ray.ObjectRef], nbytes: int
    ) -> tuple[bool, dict[str, list[ray.ObjectRef]]]:
        """Keep KV a worker evicted in its node's host memory, dropping the least recently
        used there to make room (the ref comes wrapped in a list, so that it reaches the
        HostStore unread). Returns whether it is kept (not if it cannot fit, or the node has
        no HostStore), and the chunks dropped for it that no worker's pool holds, each with
        a ref to the KV dropped (in a list): the worker records them in disk, their files
        checked against it, as its own host memory's moves to disk are."""
        with self.lock:
            budget = self.hosts.get(node)
            victims = None if budget is None else budget.admit(chunk_hash, nbytes)
            if victims is not None:
                # Sent with the lock held: a store runs one caller's calls in the order they
                # were sent, so it sees the budget's changes in the order they were made (a
                # `forget` of this chunk cannot drop it before this put lands, and each
                # victim's KV is read before it goes).
                host = self.stores[node].host
                dropped = {victim: [host.get.remote(victim)] for victim in victims}
                for victim in victims:
                    host.drop.remote(victim)
                put = host.put.remote(chunk_hash, payload[0])
        if victims is None:
            self.stats["offload_refused"] += 1
            return False, {}
        try:
            started = get(put, "host store")
        except ServiceUnavailable:
            with self.lock:  # it may have restarted empty: the next put counts it again
                self.host_started[node] = None
            raise
        if started != self.host_started[node]:
            self._recount_host(node)
        self.stats["offloaded"] += 1
        self.stats["host_dropped"] += len(victims)
        unheld = get(self.registry.unheld.remote(list(dropped)), "the registry")
        return True, {h: dropped[h] for h in unheld}

    def _recount_host(self, node: str) -> None:
        """The node's HostStore started again, and lost what it held: count what it holds
        now. With the lock held, so that every put already counted has landed (sent before
        this call) and none is counted meanwhile."""
        with self.lock:
            host = self.stores[node].host
            started, sizes = get([host.started_as.remote(), host.sizes.remote()], "host store")
            self.hosts[node] = LRUBudget(self.hosts[node].budget_bytes, sizes)
            self.host_started[node] = started
        self.stats["host_recounted"] += 1

    def drop_host(self, chunk_hash: str) -> None:
        """A chunk was archived to disk: every node's HostStore drops its copy (sent with the
        lock held, so that it lands after any put counted before it)."""
        with self.lock:
            for node, budget in self.hosts.items():
                if budget.forget(chunk_hash):
                    self.stores[node].host.drop.remote(chunk_hash)

    def in_host(self) -> list[str]:
        """The chunks some node's HostStore holds."""
        with self.lock:
            return list(dict.fromkeys(h for budget in self.hosts.values() for h in budget.sizes))

    # -- files --------------------------------------------------------------------------------

    def admit_file(self, chunk_hash: str, node: str, nbytes: int) -> bool:
        """Count a new KV file on the node's disk if the disk budget allows it."""
        with self.lock:
            budget = self.disks.get(node)
            if budget is None or chunk_hash in budget.sizes:
                return True
            if not budget.fits(nbytes):
                self.stats["file_refused"] += 1
                return False
            budget.admit(chunk_hash, nbytes)
            return True

    def forget(self, chunk_hash: str) -> None:
        """A chunk was deleted: every node's HostStore and DiskStore drops its copy."""
        with self.lock:
            hosts = [n for n, b in self.hosts.items() if b.forget(chunk_hash)]
            disks = [n for n, b in self.disks.items() if b.forget(chunk_hash)]
        for node in hosts:
            self.stores[node].host.drop.remote(chunk_hash)
        for node in disks:
            self.stores[node].disk.remove.remote(chunk_hash)

    # -- prefetch -----------------------------------------------------------------------------

    def prefetch(
        self, requester: str, chunk: ChunkInfo, active: list[str]
    ) -> tuple[str, list[str]]:
        """Run the prefetch policy for a routed activation made through `requester`, and
        choose the worker that brings in the chunk and the policy's picks: the one the
        router picks for the context's chunks. Returns that worker and the picks; the
        requester brings them in itself, another worker is told here."""
        with self.lock:  # a policy may learn from every activation it sees (co-activation)
            wanted = [chunk.hash, *self.policy.on_activate(chunk, active)]
        self.stats["prefetch_planned"] += 1
        target = self.router.pick_for([*active, *owner_hashes(chunk)])
        if target != requester:
            get(self._worker(target).prefetch_chunks.remote(wanted), "a prefetch")
            self.stats["prefetch_sent"] += 1
        return target, wanted

    # -- reports ------------------------------------------------------------------------------

    def transfers(self) -> dict[str, int]:
        return dict(self.stats)

    def usage(self) -> dict:
        """Per node: the chunks and bytes its host memory and disk hold, and their budgets."""
        with self.lock:
            return {
                node: {
                    tier: {
                        "chunks": len(budget.sizes),
                        "bytes": budget.used_bytes(),
                        "budget": budget.budget_bytes,
                    }
                    for tier, budget in (("cpu", self.hosts[node]), ("disk", self.disks[node]))
                }
                for node in self.stores
            }

    def _near_first(self, node: str) -> list[str]:
        return sorted(self.stores, key=lambda n: n != node)

    def _worker(self, name: str) -> ActorHandle:
        if name not in self.workers:
            self.workers[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self.workers[name]


def _stores_of(node: str) -> NodeStores:
    def named(kind: str) -> ActorHandle:
        return ray.get_actor(store_name(kind, node), namespace=NAMESPACE)

    return NodeStores(named(HOST_STORE), named(DISK_STORE))


TierManagerActor = ray.remote(TierManager)
