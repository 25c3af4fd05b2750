"""InferenceWorker: one engine and its paged KV pool behind a Ray actor.

It is a ContextManager per context name over one ChunkStore, nothing more: every API call
runs the plain in-process code. What it adds is the shared pool: a chunk whose KV is not in
this worker's pool is shipped from a peer (or host memory) through the object store before
the file or a recompute is tried, and every change of what the pool holds is reported to
the registry actor, so requests can be routed to the worker that holds their chunks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch

from kvchunks.actors.chunk_store import ChunkStore
from kvchunks.actors.context_manager import ContextManager, GenerationResult
from kvchunks.actors.kv_transfer import KVPayload
from kvchunks.actors.registry_actor import RegistryClient
from kvchunks.actors.remote import (
    NAMESPACE,
    REGISTRY,
    TIER_MANAGER,
    ServiceUnavailable,
    get,
)
from kvchunks.actors.router import Router
from kvchunks.common import HOME_ENV, InvalidInput
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.store import redis_server
from kvchunks.store.chunk import ChunkInfo
from kvchunks.vocabulary import farthest_tier, nearest_tier

# ContextManager methods a client runs here; the others live in the client (see client.py).
CLIENT_SIDE = frozenset({"close", "with_context", "track_output", "generate"})


Fetch = Callable[[ChunkInfo], "tuple[torch.Tensor, torch.Tensor] | None"]
HandOver = Callable[[ChunkInfo, list[str]], bool]


def _nowhere(chunk: ChunkInfo) -> None:
    return None


def _keep(chunk: ChunkInfo, active: list[str]) -> bool:
    return False


def remote_methods() -> frozenset[str]:
    public = {name for name in dir(ContextManager) if not name.startswith("_")}
    return frozenset(public - CLIENT_SIDE)


class SharedChunkStore(ChunkStore):
    """A ChunkStore in a pool shared by several workers.

    KV that is in neither this pool nor this process's host memory is first fetched with
    `fetch_remote` (shipped from a peer, counted in stats["shipped"]), and only then read
    from its file or recomputed. An activation's prefetch may be handed to the peer that the
    context's requests are routed to (`hand_over`). A worker starts with an empty pool: the
    tiers recorded in the shared registry say where a chunk was in some worker, not in this
    one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetch_remote: Fetch = _nowhere
        self.hand_over: HandOver = _keep
        self.pool_tiers: Callable[[], dict[str, str]] = dict  # hash -> best tier in the pool
        self.recompute_only = False  # for benchmarks: the cost the shared pool saves

    def fetch_kv(self, chunk: ChunkInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        # ChunkStore's step between host memory and recompute: a peer's copy comes first.
        if self.recompute_only:
            return None
        kv = self.fetch_remote(chunk)
        if kv is not None:
            self.stats["shipped"] += 1
            return kv
        return super().fetch_kv(chunk)

    def restore_tiers(self) -> None:
        return None  # see the class docstring

    def on_activate(self, chunk: ChunkInfo, active: list[str]) -> None:
        """Prefetch for the activation on the worker that the context's next request will be
        routed to: here, or handed over to that peer. Clients activate through the worker
        they last used, so the routing lookup is off the activation's path."""
        if self.engine_started and not self._closed:
            self._transfers.submit(self._prefetch_where_routed, chunk, active, self.hand_over)

    def _prefetch_where_routed(
        self, chunk: ChunkInfo, active: list[str], hand_over: HandOver
    ) -> None:
        if not hand_over(chunk, active):
            self._after_activation(chunk, active)

    def describe_many(self, chunks: list[ChunkInfo]) -> list[ChunkInfo]:
        """As ChunkStore.describe_many, with the tier each chunk has anywhere in the pool."""
        for chunk in super().describe_many(chunks):
            if chunk.tier != "gpu":
                pool = self.pool_tiers()
                tiers = [
                    nearest_tier([self.tier_of(h), pool.get(h, "disk")])
                    for h in self.owner_hashes(chunk)
                ]
                chunk.tier = farthest_tier(tiers)
        return chunks


@ray.remote
class InferenceWorker:
    def __init__(
        self,
        name: str,
        model: str | None,
        home: str | None,
        redis_url: str,
        engine_options: dict | None = None,
    ):
        if home:  # the data directory also holds the default model, as for the CLI
            os.environ[HOME_ENV] = home
        self.name = name
        self.node_id = ray.get_runtime_context().get_node_id()
        registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self.registry, self.tiers = registry, ray.get_actor(TIER_MANAGER, namespace=NAMESPACE)
        config = EngineConfig(**(engine_options or {}))
        self.store = store = SharedChunkStore(
            model, home=home, redis_url=redis_url, engine_config=config
        )
        namespace = store.registry.namespace
        store.registry = RegistryClient(redis_server.connect_url(redis_url), namespace, registry)
        store.fetch_remote = self._fetch
        self.router = Router(registry)
        self.peers: dict[str, ray.actor.ActorHandle] = {}
        self.redirects: dict[str, str] = {}  # context -> where its last prefetch was handed
        store.llm  # noqa: B018  (loads the model now: a worker is ready when it can serve)
        self.managers: dict[str, ContextManager] = {}
        self.methods = remote_methods()
        self.lock = threading.Lock()  # one API call at a time (background prefetches aside)
        c, dtype = store.model_config, store.engine_config
        self.spec = {
            "fingerprint": store.fingerprint,
            "dtype": dtype.dtype,
            "shape": (c.num_layers, None, c.num_kv_heads, c.head_dim),
        }
        self.token_bytes = c.kv_bytes(1, dtype.torch_dtype)
        self.deleted: set[str] = set()  # chunks deleted through other workers, to drop here
        self.deleted_lock = threading.Lock()
        self.reported: dict[str, str] | None = None
        self.report_lock = threading.Lock()  # calls and background prefetches both report
        self.tiers_seen: dict[str, str] | None = None
        store.pool_tiers = self._pool_tiers
        self._report()  # a restarted worker's pool is empty: forget what its last life held

    def ready(self) -> dict:
        return self.status()

    # -- the API --------------------------------------------------------------------------

    def call(
        self,
        context: str,
        method: str,
        args: tuple = (),
        kwargs: dict | None = None,
        routed: bool = True,
    ) -> tuple[Any, str | None]:
        """Run ContextManager.<method>(*args, **kwargs) for `context`: its result, and the
        worker that a routed caller should send the context's next calls to, if not here.

        Routed callers activate through the worker they last used, without asking the router
        first: the prefetch an activation starts goes to the worker the router picks, and
        that worker is named in the reply to the next call. A caller pinned to this worker
        passes routed=False: its activations prefetch here."""
        if method not in self.methods:
            raise InvalidInput(f"ContextManager has no remote method {method!r}")
        with self._serving(context if routed else None):
            manager = self._manager(context)
            if isinstance(getattr(ContextManager, method), property):
                result = getattr(manager, method)
            else:
                result = getattr(manager, method)(*args, **(kwargs or {}))
        return result, self.redirects.pop(context, None) if routed else None

    # Never re-run by Ray after a crash: the caller gets WorkerDied instead of a generation
    # that starts over (and streams its text twice) long after it gave up.
    @ray.method(num_returns="streaming", max_task_retries=0)
    def generate(
        self,
        context: str,
        prompt: str,
        params: SamplingParams | None = None,
        mode: str | None = None,
        track: bool = False,
        stream: bool = False,
        recompute: float | None = None,
    ) -> Iterator[str | GenerationResult]:
        """Yield the answer's new text as it comes (with `stream`), then the result."""
        request = (context, prompt, params, mode, recompute, track)
        if not stream:
            yield self._generate(*request, None)
            return
        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = self._generate(*request, pieces.put)
            except BaseException as e:  # handed to the caller below, as raised
                outcome["error"] = e
            finally:
                pieces.put(None)

        threading.Thread(target=run, daemon=True).start()
        while (piece := pieces.get()) is not None:
            yield piece
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"]

    def _generate(
        self, context, prompt, params, mode, recompute, track, on_text
    ) -> GenerationResult:
        self.redirects.pop(context, None)  # the client routed this request: that choice stands
        with self._serving():
            manager = self._manager(context)
            if not track:
                return manager.generate(prompt, params, mode, on_text, recompute)
            # The client tracks outputs; the manager must know, for output_tokens="manual".
            with manager.track_output():
                return manager.generate(prompt, params, mode, on_text, recompute)

    @contextlib.contextmanager
    def _serving(self, routed_context: str | None = None) -> Iterator[None]:
        """One call at a time, after dropping chunks deleted elsewhere, and report the pool
        after it. With `routed_context`, the call's activations prefetch where the router
        sends that context (see `call`); else here."""
        with self.lock:
            self.store.hand_over = (
                functools.partial(self._hand_over, routed_context) if routed_context else _keep
            )
            self.tiers_seen = None
            with self.deleted_lock:
                deleted, self.deleted = self.deleted, set()
            self._drop(self.store.registry.missing(deleted))  # unless added again meanwhile
            try:
                yield
            finally:
                self._report()

    def forget(self, hashes: list[str]) -> None:
        """These chunks were deleted through another worker: drop them before the next call
        (now could be in the middle of a generation that reads them)."""
        with self.deleted_lock:
            self.deleted.update(hashes)

    def _drop(self, hashes: list[str]) -> None:
        with self.store.lock:
            for chunk_hash in hashes:
                self.store.drop(chunk_hash)

    def _manager(self, context: str) -> ContextManager:
        if context not in self.managers:
            self.managers[context] = ContextManager(context=context, store=self.store)
        return self.managers[context]

    # -- the shared pool ------------------------------------------------------------------

    def read_kv(self, chunk_hash: str) -> KVPayload | None:
        """A copy of the chunk's KV from this pool or host memory (for a peer, a tier store).

        Takes no lock, so that two workers each waiting on the other cannot deadlock: it
        reads the blocks, then checks that the chunk still owns them (eviction takes a
        chunk out of the pool before it frees its blocks).
        """
        store = self.store
        segments = store.kv.get(chunk_hash)
        if segments is not None:
            k, v = store.read_kv(segments)
            if store.kv.get(chunk_hash) is segments:
                return KVPayload.from_tensors(k, v)
        host = store.host.kv.get(chunk_hash)
        return KVPayload.from_tensors(*host) if host is not None else None

    def _fetch(self, chunk: ChunkInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            ref = get(self.tiers.fetch.remote(chunk.hash, self.name, self.node_id, self.spec))
            payload = get(ref, "KV transfer") if ref is not None else None
        except ServiceUnavailable:  # the peer died meanwhile: the file or a recompute will do
            return None
        layers, _, heads, dim = self.spec["shape"]
        expected = (layers, chunk.token_count, heads, dim)
        if payload is None or payload.shape != expected or payload.dtype != self.spec["dtype"]:
            return None
        return payload.tensors()

    def _hand_over(self, context: str, chunk: ChunkInfo, active: list[str]) -> bool:
        """Have the worker that the router picks for the context's chunks prefetch for the
        activation, if that is another one (True: handed over, not awaited)."""
        needed = [*active, *self.store.owner_hashes(chunk)]
        if all(h in self.store.kv for h in needed):  # all here: no worker holds more
            return False
        try:
            best = self.router.pick_for(needed)
            if best == self.name:
                return False
            if best not in self.peers:
                self.peers[best] = ray.get_actor(best, namespace=NAMESPACE)
            self.peers[best].prefetch_for_activation.remote(chunk, active)
        except (ServiceUnavailable, ValueError):  # no router, or no such peer: prefetch here
            return False
        self.redirects[context] = best
        self.store.stats["prefetch_handed_over"] += 1
        return True

    def prefetch_for_activation(self, chunk: ChunkInfo, active: list[str]) -> None:
        """Prefetch for an activation made through another worker (see _hand_over), and
        report the pool when it is done: no call of this worker's may come to report it."""
        self.store.prefetch_for_activation(chunk, active)
        self.store.after_transfers(self._report)

    def _report(self) -> None:
        """Tell the registry what this pool and host memory hold, when that changed."""
        with self.report_lock:
            while deleted := self._report_once():  # loaded here while deleted elsewhere
                self._drop(deleted)

    def _report_once(self) -> list[str]:
        store = self.store
        with store.lock:  # background transfers change the pool meanwhile
            tiers = dict.fromkeys(store.kv, "gpu") | dict.fromkeys(store.host.kv, "cpu")
            if tiers == self.reported:
                return []
            held = {
                h: sum(s.length for s in segs) * self.token_bytes for h, segs in store.kv.items()
            }
            held |= {h: k.nbytes + v.nbytes for h, (k, v) in store.host.kv.items()}
            pool = self._pool()
        deleted = get(self.registry.report.remote(self.name, tiers, held, pool), "registry report")
        self.reported = tiers
        return deleted

    def _pool_tiers(self) -> dict[str, str]:
        """The pool's tiers, read once per call (describe asks for every chunk it shows)."""
        if self.tiers_seen is None:
            self.tiers_seen = get(self.registry.pool_tiers.remote(), "registry pool tiers")
        return self.tiers_seen

    def _pool(self) -> dict:
        blocks = self.store.llm.block_manager
        return {"blocks_free": blocks.num_free, "blocks_total": blocks.num_blocks}

    # -- operations -----------------------------------------------------------------------

    def info(self) -> dict:
        return {**self.spec, "token_bytes": self.token_bytes, "block_size": self.store.block_size}

    def status(self) -> dict:
        store = self.store
        return {
            "name": self.name,
            "node": self.node_id,
            "device": str(store.engine_config.device),
            "threads": torch.get_num_threads(),
            **self._pool(),
            "block_size": store.block_size,
            "chunks": len(store.kv),
            "kv_bytes": sum(sum(s.length for s in v) for v in store.kv.values()) * self.token_bytes,
            "host_chunks": len(store.host.kv),
            "host_bytes": store.host.used_bytes,
            "contexts": sorted(self.managers),
            "stats": dict(store.stats),
            "busy": self.lock.locked(),
        }

    def violations(self) -> list[str]:
        """The registry's and this worker's broken invariants (see ChunkStore.violations)."""
        with self._serving():
            self.store.wait_for_transfers()
            return self.store.violations()

    def evict(self, hashes: list[str] | None = None) -> int:
        """Leave chunks only in their files here (all with None): out of pool and host memory."""
        with self._serving():
            store = self.store
            chosen = [*store.kv, *store.host.kv] if hashes is None else hashes
            for chunk_hash in chosen:
                store.archive_to_disk(store.registry.get(chunk_hash))
            return len(chosen)

    def set_recompute_only(self, on: bool) -> None:
        self.store.recompute_only = on
