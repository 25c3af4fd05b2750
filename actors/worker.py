"""InferenceWorker: one engine and its paged KV pool behind a Ray actor.

It is a ContextManager per context name over one ChunkStore, nothing more: every API call
runs the plain in-process code. What it adds is the shared pool: a chunk whose KV is not in
this worker's pool is shipped from a peer (or host memory) through the object store before
the file or a recompute is tried, and every change of what the pool holds is reported to
the registry actor, so requests can be routed to the worker that holds their chunks.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator

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
from kvchunks.common import HOME_ENV, InvalidInput, KVSegment
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.store import redis_server
from kvchunks.store.chunk import ChunkInfo

# ContextManager methods a client runs here; the others live in the client (see client.py).
CLIENT_SIDE = frozenset({"close", "with_context", "track_output", "generate"})


Fetch = Callable[[ChunkInfo], "tuple[torch.Tensor, torch.Tensor] | None"]


def _nowhere(chunk: ChunkInfo) -> None:
    return None


def remote_methods() -> frozenset[str]:
    public = {name for name in dir(ContextManager) if not name.startswith("_")}
    return frozenset(public - CLIENT_SIDE)


class SharedChunkStore(ChunkStore):
    """A ChunkStore in a pool shared by several workers: KV missing here is first fetched
    with `fetch_remote` (shipped, counted in stats["shipped"]), then loaded from its file or
    recomputed as usual."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetch_remote: Fetch = _nowhere
        self.recompute_only = False  # for benchmarks: the cost the shared pool saves

    def ensure_resident(self, chunk: ChunkInfo) -> list[KVSegment]:
        if chunk.hash not in self.kv:
            if self.recompute_only:
                self.kv[chunk.hash] = self._recompute(chunk)
            elif (kv := self.fetch_remote(chunk)) is not None:
                self.kv[chunk.hash] = [self.llm.write_kv(*kv, chunk.position)]
                self.stats["shipped"] += 1
        return super().ensure_resident(chunk)


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
        self.store = SharedChunkStore(model, home=home, redis_url=redis_url, engine_config=config)
        namespace = self.store.registry.namespace
        self.store.registry = RegistryClient(
            redis_server.connect_url(redis_url), namespace, registry
        )
        self.store.fetch_remote = self._fetch
        self.managers: dict[str, ContextManager] = {}
        self.methods = remote_methods()
        self.lock = threading.Lock()  # the engine and the store serve one call at a time
        c, llm = self.store.llm.model_config, self.store.llm
        self.spec = {
            "fingerprint": self.store.fingerprint,
            "dtype": llm.config.dtype,
            "shape": (c.num_layers, None, c.num_kv_heads, c.head_dim),
        }
        self.token_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim
        self.token_bytes *= llm.config.torch_dtype.itemsize
        self.reported: set[str] | None = None
        self._report()  # a restarted worker's pool is empty: forget what its last life held

    def ready(self) -> dict:
        return self.status()

    # -- the API --------------------------------------------------------------------------

    def call(self, context: str, method: str, args: tuple = (), kwargs: dict | None = None):
        """Run ContextManager.<method>(*args, **kwargs) for `context`."""
        if method not in self.methods:
            raise InvalidInput(f"ContextManager has no remote method {method!r}")
        with self._serving():
            manager = self._manager(context)
            if isinstance(getattr(ContextManager, method), property):
                return getattr(manager, method)
            return getattr(manager, method)(*args, **(kwargs or {}))

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
    ) -> Iterator[str | GenerationResult]:
        """Yield the answer's new text as it comes (with `stream`), then the result."""
        if not stream:
            yield self._generate(context, prompt, params, mode, track, None)
            return
        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = self._generate(context, prompt, params, mode, track, pieces.put)
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

    def _generate(self, context, prompt, params, mode, track, on_text) -> GenerationResult:
        with self._serving():
            manager = self._manager(context)
            if not track:
                return manager.generate(prompt, params, mode, on_text)
            # The client tracks outputs; the manager must know, for output_tokens="manual".
            with manager.track_output():
                return manager.generate(prompt, params, mode, on_text)

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        with self.lock:
            try:
                yield
            finally:
                self._report()

    def _manager(self, context: str) -> ContextManager:
        if context not in self.managers:
            self.managers[context] = ContextManager(context=context, store=self.store)
        return self.managers[context]

    # -- the shared pool ------------------------------------------------------------------

    def read_kv(self, chunk_hash: str) -> KVPayload | None:
        """A copy of the chunk's KV if it is in this pool (for a peer or a tier store).

        Takes no lock: it only reads blocks of a stored chunk, which nothing writes, and a
        worker that waits on a peer while that peer waits on it must not deadlock.
        """
        segments = self.store.kv.get(chunk_hash)
        if segments is None:
            return None
        return KVPayload.from_tensors(*self.store.read_kv(segments))

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

    def _report(self) -> None:
        """Tell the registry what this pool holds, when that changed."""
        held = {
            h: sum(s.length for s in segs) * self.token_bytes for h, segs in self.store.kv.items()
        }
        if set(held) == self.reported:
            return
        get(self.registry.report.remote(self.name, held, self._pool()), "registry report")
        self.reported = set(held)

    def _pool(self) -> dict:
        blocks = self.store.llm.block_manager
        return {"blocks_free": blocks.num_free, "blocks_total": blocks.num_blocks}

    # -- operations -----------------------------------------------------------------------

    def info(self) -> dict:
        return {**self.spec, "token_bytes": self.token_bytes, "block_size": self.store.block_size}

    def status(self) -> dict:
        llm = self.store.llm
        return {
            "name": self.name,
            "node": self.node_id,
            "device": str(llm.config.device),
            "threads": torch.get_num_threads(),
            **self._pool(),
            "block_size": self.store.block_size,
            "chunks": len(self.store.kv),
            "kv_bytes": sum(sum(s.length for s in v) for v in self.store.kv.values())
            * self.token_bytes,
            "contexts": sorted(self.managers),
            "stats": dict(self.store.stats),
            "busy": self.lock.locked(),
        }

    def evict(self, hashes: list[str] | None = None) -> int:
        """Drop chunks' KV from this pool (all with None); files and records stay."""
        with self._serving():
            chosen = list(self.store.kv) if hashes is None else hashes
            for chunk_hash in chosen:
                self.store.evict(chunk_hash)
            return len(chosen)

    def set_recompute_only(self, on: bool) -> None:
        self.store.recompute_only = on
