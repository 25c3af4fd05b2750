"""The shared chunk pool of one engine, assembled from its parts: chunk records in the
registry, their KV in the engine's paged pool, host memory and files, and the three ways of
combining stored KV. Every context (activation set) of a process works on one ChunkStore.

Each part has one role and is handed what it uses:

    model       ModelHost    the model's config, tokenizer, fingerprint; the engine, lazily
    files       ChunkFiles   the disk tier: one checked KV file per chunk
    loader      KVLoader     KV from outside this process's memory (peers, files), once
    tiers       Tiers        what is in the pool and host memory; budgets, LRU, moves down
    composer    Composer     what a new chunk attends to in each mode; derived KV; recompute
    prefetcher  Prefetcher   background loads after activations
    maker       ChunkMaker   new chunks, views, deletion
    views       ChunkViews   records as callers see them (tier, pool segments)
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from kvchunks.common import CapacityError, DtypeMismatch, KVChunksError, OnProgress, data_dir
from kvchunks.engine import LLM, EngineConfig
from kvchunks.policies.budgets import TierBudgets
from kvchunks.policies.prefetch import make_policy
from kvchunks.service import audit
from kvchunks.service.chunk_files import AdmitFile, ChunkFiles
from kvchunks.service.chunks import ChunkMaker
from kvchunks.service.compose import Composer
from kvchunks.service.kv_sources import KVLoader, KVSource
from kvchunks.service.lease import StoreLease
from kvchunks.service.model_host import ModelHost
from kvchunks.service.node_memory import NodeMemory
from kvchunks.service.pieces import owners
from kvchunks.service.prefetcher import HandOver, Prefetcher
from kvchunks.service.tiers import Tiers
from kvchunks.service.views import ChunkViews, PoolTiers
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.host_memory import HostMemory
from kvchunks.store.redis_server import close as close_redis
from kvchunks.store.redis_server import connect
from kvchunks.store.registry import ChunkRegistry


class ChunkStore:
    def __init__(
        self,
        model: str | Path | ModelHost | None = None,
        *,
        home: str | Path | None = None,
        redis_url: str | None = None,
        engine_config: EngineConfig | None = None,
        llm: LLM | None = None,
        namespace: str = "kvchunks",
        budgets: TierBudgets | None = None,
        prefetch_policy: str | None = None,  # None: KVCHUNKS_PREFETCH_POLICY, else provenance
        registry: ChunkRegistry | None = None,
        peers: KVSource | None = None,  # asked before the files: a shared pool's other copies
        node_memory: NodeMemory | None = None,  # instead of host memory: a shared pool's
        admit_file: AdmitFile | None = None,  # instead of the disk budget: a shared pool's
        hand_over: HandOver | None = None,
        pool_tiers: PoolTiers | None = None,
        restore: bool = True,  # bring back the recorded gpu/cpu tiers when the engine starts
        holder_name: str | None = None,  # a worker's: its calls' holds outlive a crash of it
    ):
        self.home = Path(home) if home is not None else data_dir()
        if isinstance(model, ModelHost):
            self.model = model
        else:
            self.model = ModelHost(model, self.home, engine_config, llm)
        self.lock = self.model.lock
        self.stats: Counter[str] = Counter()
        self._redis = None if registry else connect(self.home, redis_url)
        self.registry = registry or ChunkRegistry(self._redis, namespace)
        self.budgets = budgets or TierBudgets.from_env()
        self.host = HostMemory(self.budgets.cpu_bytes, pinned=self.model.pinned_memory)
        self.files = ChunkFiles(
            self.home,
            self.model.fingerprint,
            self.model.engine_config.dtype,
            self.model.kv_shape(),
            self.host,
            self.stats,
            self.budgets.disk_bytes,
            self.budgets.disk_compression,
            admit_file,
        )
        self.loader = KVLoader([peers, self.files] if peers else [self.files], self.stats)
        self.tiers = Tiers(
            self.model,
            self.registry,
            self.files,
            self.host,
            self.loader,
            self.budgets,
            self.lock,
            self.stats,
            node_memory,
        )
        self.composer = Composer(
            self.model, self.registry, self.tiers, self.files, self.lock, self.stats
        )
        policy = make_policy(prefetch_policy, self.registry)
        self.prefetcher = Prefetcher(
            self.registry, self.tiers, self.composer, self.loader, policy, hand_over
        )
        self.maker = ChunkMaker(
            self.registry,
            self.tiers,
            self.composer,
            self.model.fingerprint,
            self.model.tokenizer,
            self.lock,
            holder_name or uuid.uuid4().hex,
        )
        self.views = ChunkViews(self.tiers, pool_tiers)
        try:  # on an engine already started the hooks run now, and may fail (Redis away)
            self.model.on_start(self.tiers.opening_kv)
            self.model.on_start(self._record_opening)
            if restore:
                self.model.on_start(self.restore_tiers)
        except BaseException:  # a store never made leaves no pool blocks, thread or connection
            self._let_go_of_parts()
            raise
        # Last, for the same reason; no call of this store holds a chunk before it exists.
        self.lease = StoreLease(
            self.registry, self.maker.holder_name, self.maker.let_go_of_lapsed_stores
        )

    # -- tier moves (a view: its sources') ------------------------------------------------

    def move(self, chunks: list[ChunkInfo], tier: str, on_progress: OnProgress | None) -> None:
        """Move chunks' KV to `tier` (gpu, cpu or disk), one after another; for cpu, refused
        before anything moves unless they fit host memory together. `on_progress(done,
        total)` is told the bytes of KV moved so far: 0, then after each chunk."""
        moves = {"gpu": self.move_to_gpu, "cpu": self.move_to_cpu, "disk": self.archive_to_disk}
        if tier == "cpu":
            self._check_fits_host([o for c in chunks for o in owners(self.registry, c)])
        total = sum(self.model.kv_bytes(c.token_count) for c in chunks)
        report = on_progress or (lambda done, total: None)
        done = 0
        report(done, total)
        for chunk in chunks:
            moves[tier](chunk)
            done += self.model.kv_bytes(chunk.token_count)
            report(done, total)

    def _check_fits_host(self, chunks: list[ChunkInfo]) -> None:
        """Refuse chunks whose KV together exceeds host memory: moved one after another,
        each later one would push earlier ones on to disk."""
        unique = list({c.hash: c for c in chunks}.values())
        need = sum(self.model.kv_bytes(c.token_count) for c in unique)
        budget = self.tiers.host.budget_bytes
        if need > budget:
            what = f"chunk {unique[0].hash[:12]}" if len(unique) == 1 else f"{len(unique)} chunks"
            raise CapacityError(
                f"the KV of {what} ({need} bytes) does not fit the cpu budget of "
                f"{budget} bytes; archive to disk instead"
            )

    def move_to_gpu(self, chunk: ChunkInfo) -> None:
        for owner in owners(self.registry, chunk):
            self.composer.owned_kv(owner)

    def move_to_cpu(self, chunk: ChunkInfo) -> None:
        # Not under the pool lock: to_host takes it only around what needs it, not the copy.
        chunk_owners = owners(self.registry, chunk)
        self._check_fits_host(chunk_owners)  # refused before anything moves
        self.prefetcher.moved_out([o.hash for o in chunk_owners])
        for owner in chunk_owners:
            if not self.tiers.to_host(owner):  # no copy left: computed in the pool first
                self.composer.owned_kv(owner)
                self.tiers.to_host(owner)

    def archive_to_disk(self, chunk: ChunkInfo) -> None:
        chunk_owners = owners(self.registry, chunk)
        self.prefetcher.moved_out([o.hash for o in chunk_owners])
        with self.lock:
            for owner in chunk_owners:
                if not self.tiers.to_disk(owner.hash):
                    self.composer.owned_kv(owner)
                    self.tiers.to_disk(owner.hash)

    @contextlib.contextmanager
    def put_back_if_interrupted(self) -> Iterator[None]:
        """Run a computation that makes room in the pool; if it is interrupted (Ctrl-C), the
        chunks it moved out come back from host memory, so their tiers and records are as
        before it started. Those that went on to disk stay there, recorded so."""
        resident = set(self.tiers.kv)
        try:
            yield
        except KeyboardInterrupt:
            with self.lock:
                moved_out = [h for h in resident - set(self.tiers.kv) if h in self.host]
                for chunk in self.registry.get_many(moved_out):
                    self.tiers.bring_in(chunk)
            raise

    # -- life ---------------------------------------------------------------------------------

    def restore_tiers(self) -> None:
        """Bring back what was in the gpu and cpu tiers when the store last ran (called when
        the engine starts)."""
        for chunk in self.registry.list_chunks():
            if chunk.layout == "view" or chunk.tier == "disk":
                continue
            try:
                if chunk.tier == "gpu":
                    self.composer.owned_kv(chunk)
                else:
                    self.move_to_cpu(chunk)
            except DtypeMismatch:  # another dtype's chunk: left where that dtype keeps it
                continue
            except KVChunksError:  # no room, or its KV lost for good: a use of it says why
                self.tiers.records.record(chunk.hash, "disk")

    def _record_opening(self) -> None:
        """For the checks that run without the model (the command line's quick activate)."""
        self.registry.record_opening(str(self.model.path.resolve()), len(self.model.chat.opening))

    def wait_for_transfers(self) -> None:
        self.prefetcher.wait()

    def violations(self) -> list[str]:
        return audit.violations(self.tiers)

    def close(self) -> None:
        """End the lease, finish transfers, give the pool blocks back to the engine,
        disconnect from Redis."""
        self.lease.close()
        self._let_go_of_parts()

    def _let_go_of_parts(self) -> None:
        self.prefetcher.close()
        self.tiers.release_all()
        self.tiers.records.close()
        if self._redis is not None:
            close_redis(self._redis)
