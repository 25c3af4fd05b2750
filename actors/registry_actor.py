"""The ChunkRegistry actor: the one place a service's metadata changes are applied, in order.

It owns the connection to Redis (and, with no URL, starts the embedded server that the
workers on its node then join). Workers read records straight from Redis, which is fast and
always consistent, but send every write here (`RegistryClient`), so writes from all workers
and clients are applied one at a time, each durable in Redis before the call returns.

It also keeps the shared pool's map: which worker holds which chunk's KV (in its pool or
its host memory), and how many bytes. That map is soft state, rebuilt from the workers'
reports: a restarted worker reports an empty pool, a restarted registry actor asks every
worker to report again, and the KV itself can always come back from a file or its tokens.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import ray
import redis

from kvchunks.actors.remote import NAMESPACE, TIER_MANAGER, get
from kvchunks.common import InvalidInput, KVChunksError
from kvchunks.store import redis_server
from kvchunks.store.chunk import is_hash
from kvchunks.store.registry import ChunkRegistry

# ChunkRegistry methods that change state; RegistryClient sends these to the actor. Every
# other public method is a read (READS), which a client makes on Redis itself.
WRITES = (
    "put",
    "update",
    "add_tag",
    "remove_tag",
    "delete",
    "take_back",
    "hold",
    "let_go",
    "renew_lease",
    "end_lease",
    "forget_store",
    "activate",
    "activate_many",
    "deactivate",
    "find_and_deactivate",
    "find_and_deactivate_many",
    "reorder",
    "clear_context",
    "delete_context",
    "update_settings",
    "set_tiers",
    "record_opening",
)
READS = (
    "get",
    "get_many",
    "get_present",
    "exists",
    "missing",
    "resolve",
    "find",
    "find_with_active",
    "find_many_with_active",
    "list_chunks",
    "held",
    "holds_of",
    "orphan_marks",
    "lapsed_stores",
    "by_content",
    "parents",
    "children",
    "contexts",
    "active",
    "active_anywhere",
    "settings",
    "opening",
)


@ray.remote
class RegistryActor:
    def __init__(
        self,
        home: str | None,
        redis_url: str | None,
        workers: list[str],
        namespace: str = "kvchunks",
    ):
        home_dir = Path(home) if home else None
        self.url = redis_url or os.environ.get(redis_server.URL_ENV)
        self.redis = redis_server.connect(home_dir, self.url)
        self.registry = ChunkRegistry(self.redis, namespace)
        self.workers = list(workers)
        self.held: dict[str, dict[str, int]] = {w: {} for w in workers}  # worker -> hash -> bytes
        self.tiers: dict[str, dict[str, str]] = {}  # worker -> hash -> gpu / cpu
        self.pools: dict[str, dict] = {}  # worker -> its last reported pool figures
        self.owners: dict[str, list[str]] = {}  # chunk -> chunks owning its KV (cache)
        self.handles: dict[str, ray.actor.ActorHandle] = {}  # actor name -> its handle
        self._ask_for_reports()

    def _ask_for_reports(self) -> None:
        """Have the running workers report their pools: after a restart the map is empty,
        and a worker reports only what changed. Not awaited; at the service's start no
        worker runs yet."""
        for worker in self.workers:
            with contextlib.suppress(ValueError):
                self._actor(worker).report_again.remote()

    def ready(self) -> bool:
        return True

    def redis_url(self) -> str:
        """Where workers read the registry: the given URL, or the embedded server's socket
        (so a worker can never start a second embedded server by mistake)."""
        return self.url or f"unix://{self.redis.socket_file}"

    def call(self, method: str, *args, **kwargs):
        """Run one ChunkRegistry method here (every write of the service comes through)."""
        if method not in WRITES and method not in READS:
            raise InvalidInput(f"the registry has no method {method!r}")
        result = getattr(self.registry, method)(*args, **kwargs)
        if method == "delete" or (method == "take_back" and result):
            self._forget_everywhere(args[0])
        return result

    # -- the shared pool's map ------------------------------------------------------------

    def report(
        self, worker: str, tiers: dict[str, str], held: dict[str, int], pool: dict
    ) -> list[str]:
        """A worker's chunks (hash -> gpu or cpu, and KV bytes) and pool figures, replacing
        what it reported before. Returns the reported chunks that were deleted meanwhile (a
        worker can load a chunk while another deletes it): the worker drops them."""
        if worker not in self.held:
            self.workers.append(worker)
        known = self.tiers.get(worker, {})
        deleted = self.registry.missing([h for h in tiers if h not in known])
        for chunk_hash in deleted:
            del tiers[chunk_hash]
            held.pop(chunk_hash, None)
        self.tiers[worker], self.held[worker], self.pools[worker] = tiers, held, pool
        return deleted

    def _forget_everywhere(self, chunk_hash: str) -> None:
        """A chunk was deleted through one worker: the others, and the TierManager (host
        memory and files on every node), drop their copies too. Not awaited: a worker may
        be busy; the actors are looked up by name, as they start after this one."""
        self.owners.pop(chunk_hash, None)
        with contextlib.suppress(ValueError):  # no TierManager: a service still starting
            self._actor(TIER_MANAGER).forget.remote(chunk_hash)
        for worker in self.holders(chunk_hash):
            self.held[worker].pop(chunk_hash, None)
            self.tiers.get(worker, {}).pop(chunk_hash, None)
            self._actor(worker).forget.remote([chunk_hash])

    def _actor(self, name: str) -> ray.actor.ActorHandle:
        if name not in self.handles:
            self.handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self.handles[name]

    def pool_tiers(self, exclude: str | None = None) -> dict[str, str]:
        """Each chunk held by some worker (but `exclude`, which knows its own), and its best
        tier there (gpu before cpu)."""
        best: dict[str, str] = {}
        for worker, tiers in self.tiers.items():
            if worker == exclude:
                continue
            for chunk_hash, tier in tiers.items():
                if best.get(chunk_hash) != "gpu":
                    best[chunk_hash] = tier
        return best

    def holders(self, chunk_hash: str) -> list[str]:
        return [w for w in self.workers if chunk_hash in self.held.get(w, {})]

    def unheld(self, hashes: list[str]) -> list[str]:
        """Those of `hashes` that no worker's pool holds."""
        return [h for h in hashes if not self.holders(h)]

    def placement(self, context: str | None, adding: str | None = None) -> dict:
        """`placement_of` the context's active chunks (none for None) with the chunk `adding`
        refers to (about to be activated, or moved out)."""
        chunks = self.registry.active(context) if context is not None else []
        if adding is not None:
            with contextlib.suppress(KVChunksError):  # the worker reports a bad ref properly
                chunks.append(adding if is_hash(adding) else self.registry.resolve(adding))
        return self.placement_of(chunks)

    def placement_of(self, hashes: list[str]) -> dict:
        """For each worker: bytes of these chunks' KV it holds, and its free blocks."""
        try:
            owners = self._owners(hashes)
        except KVChunksError:  # a chunk deleted meanwhile, or a bad hash: route on nothing
            owners = []
        held = {w: sum(self.held.get(w, {}).get(h, 0) for h in owners) for w in self.workers}
        free = {w: self.pools.get(w, {}).get("blocks_free", 0) for w in self.workers}
        return {"workers": list(self.workers), "held": held, "free": free}

    def _owners(self, hashes: list[str]) -> list[str]:
        """The chunks that own the KV of these chunks (a view reads its sources')."""
        missing = [h for h in hashes if h not in self.owners]
        for chunk in self.registry.get_many(missing):  # a hash's owners never change
            views = chunk.layout == "view"
            self.owners[chunk.hash] = [s.hash for s in chunk.sources] if views else [chunk.hash]
        return list(dict.fromkeys(o for h in hashes for o in self.owners[h]))

    def list_workers(self) -> list[str]:
        return list(self.workers)

    def summary(self) -> dict:
        hashes_key = f"{self.registry.namespace}:hashes"  # see the key layout in store/registry.py
        return {
            "chunks": int(self.redis.zcard(hashes_key)),
            "contexts": len(self.registry.contexts()),
            "redis": self.redis.connection_pool.connection_kwargs.get("path")
            or self.redis.connection_pool.connection_kwargs.get("host", "?"),
        }

    def shutdown(self) -> None:
        """Close Redis (the embedded server stops with its last client) and exit."""
        deadline = time.monotonic() + 5
        # Killed workers' connections close with their processes; give the server a moment
        # to notice, so that closing ours is the last one and the embedded server stops.
        while time.monotonic() < deadline and self._other_clients():
            time.sleep(0.1)
        redis_server.close(self.redis)
        ray.actor.exit_actor()

    def _other_clients(self) -> int:
        try:
            return len(self.redis.client_list()) - 1
        except redis.RedisError:
            return 0


class RegistryClient(ChunkRegistry):
    """A ChunkRegistry that reads from Redis directly and sends every write to the actor."""

    def __init__(
        self, client: redis.Redis, actor: ray.actor.ActorHandle, namespace: str = "kvchunks"
    ):
        super().__init__(client, namespace)
        self._actor = actor


def _through_actor(name: str):
    def method(self: RegistryClient, *args, **kwargs):
        return get(self._actor.call.remote(name, *args, **kwargs), f"registry {name}")

    method.__name__ = method.__qualname__ = name
    method.__doc__ = getattr(ChunkRegistry, name).__doc__
    return method


for _name in WRITES:
    setattr(RegistryClient, _name, _through_actor(_name))


class RedisProvenance:
    """The registry reads of a prefetch policy, straight from Redis as a worker reads, for
    an actor built elsewhere (the TierManager): it connects on its first read, in the
    actor's process."""

    def __init__(self, redis_url: str, namespace: str = "kvchunks"):
        self.redis_url, self.namespace = redis_url, namespace
        self._registry: ChunkRegistry | None = None

    def children(self, chunk_hash: str) -> list[str]:
        if self._registry is None:
            self._registry = ChunkRegistry(redis_server.connect_url(self.redis_url), self.namespace)
        return self._registry.children(chunk_hash)
