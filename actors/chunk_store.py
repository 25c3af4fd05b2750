"""The shared chunk pool of one engine: chunk records in the registry, their KV in the engine's
paged pool and in safetensors files, and the three ways of combining stored KV.

Every context (activation set) of a process works on one ChunkStore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from kvchunks.common import (
    CapacityError,
    ChunkFileError,
    ChunkNotFound,
    KVSegment,
    data_dir,
    slice_segments,
)
from kvchunks.engine import LLM, EngineConfig, ModelConfig
from kvchunks.engine.chat import ChatFormat
from kvchunks.engine.checkpoint import resolve_model
from kvchunks.policies.budgets import TierBudgets
from kvchunks.policies.lru import LRU
from kvchunks.policies.prefetch import make_policy
from kvchunks.store.audit import registry_violations
from kvchunks.store.chunk import ChunkInfo, SourceSpan
from kvchunks.store.hashing import (
    chunk_hash,
    composition_key,
    content_hash,
    context_hash,
    model_fingerprint,
    weights_digest,
)
from kvchunks.store.host_memory import HostMemory
from kvchunks.store.kv_file import kv_path, read_kv_file, remove_partial_files, write_kv_file
from kvchunks.store.redis_server import close as close_redis
from kvchunks.store.redis_server import connect
from kvchunks.store.registry import ChunkRegistry
from kvchunks.store.tier_records import TierRecords
from kvchunks.vocabulary import combination, farthest_tier, recompute_of, split_combination

_DIGESTS: dict[str, str] = {}  # weights digest by file stamp: hashing 0.5 GB once is enough


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of a chunk that owns KV (not a view)."""

    chunk: ChunkInfo
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def key(self) -> tuple[str, int, int]:
        return (self.chunk.hash, self.start, self.end)


@dataclass
class AttentionContext:
    """What a new chunk attends to, and where its tokens go."""

    segments: list[KVSegment]
    position: int
    combine: str  # "" when the context is one timeline (all modes agree), else its name
    reused: int = 0  # context tokens whose KV was used as it was stored or derived before
    recomputed: int = 0  # context tokens whose KV was computed for this context now
    held: list[str] = field(default_factory=list)  # derived KV pinned until `release`


@dataclass
class Composition:
    """Derived KV: chunks computed apart, placed one after another and partly or wholly
    recomputed in that order. It can always be made again, so under pressure it is dropped
    rather than moved down a tier, and it goes when a chunk it was made from is deleted."""

    segment: KVSegment
    sources: frozenset[str]  # the chunks (owning KV) it was made from


class ChunkStore:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        home: str | Path | None = None,
        redis_url: str | None = None,
        engine_config: EngineConfig | None = None,
        llm: LLM | None = None,
        namespace: str = "kvchunks",
        budgets: TierBudgets | None = None,
        prefetch_policy: str | None = None,  # None: KVCHUNKS_PREFETCH_POLICY, else provenance
    ):
        self.home = Path(home) if home is not None else data_dir()
        # The engine (weights and KV pool) starts on first use: listing, tagging or
        # activating chunks needs only the registry, the model's config and its tokenizer.
        self._llm = llm
        self.path = llm.path if llm else resolve_model(model)
        self.engine_config = llm.config if llm else (engine_config or EngineConfig())
        self.model_config = ModelConfig.from_folder(self.path)
        self.tokenizer = llm.tokenizer if llm else AutoTokenizer.from_pretrained(self.path)
        self.chat = ChatFormat(self.tokenizer)
        self.block_size = self.engine_config.block_size
        remove_partial_files(self.home)  # left by a process killed while writing KV
        self._redis = connect(self.home, redis_url)
        self.registry = ChunkRegistry(self._redis, namespace)
        self.tier_records = TierRecords(self.registry)
        self.fingerprint = self._fingerprint()
        self.kv: dict[str, list[KVSegment]] = {}  # resident KV of chunks that own KV
        self.compositions: dict[str, Composition] = {}  # derived KV by composition key
        self.stats: Counter[str] = Counter()
        self._token_counts: dict[str, int] = {}
        # Tiers: the pool (`gpu`), host memory (`cpu`) and the KV files (`disk`, which every
        # chunk has from its creation on). A chunk's KV is in at most one of gpu and cpu.
        self.budgets = budgets or TierBudgets.from_env()
        self.host = HostMemory(
            self.budgets.cpu_bytes, pinned=torch.device(self.engine_config.device).type == "cuda"
        )
        self.lru = LRU()
        self.pinned: Counter[str] = Counter()  # chunks a running generation attends to
        self.prefetch_policy = make_policy(prefetch_policy, self.registry)
        # One lock for the pool and the tiers: background prefetches write into the pool
        # between engine steps, never during one.
        self.lock = threading.RLock()
        self._transfers = ThreadPoolExecutor(1, thread_name_prefix="kvchunks-prefetch")
        self._inflight: dict[str, Future] = {}  # hash -> done when in the pool
        self._inflight_lock = threading.Lock()
        self._loading: dict[str, Future] = {}  # hash -> its KV, once loaded
        self._loading_lock = threading.Lock()
        self._closed = False
        if llm is not None:
            self.restore_tiers()

    @property
    def llm(self) -> LLM:
        """The engine, started on first use; it then brings back the recorded gpu/cpu tiers."""
        if self._llm is None:
            with self.lock:
                if self._llm is None:
                    self._llm = LLM(self.path, self.engine_config)
                    self.restore_tiers()
        return self._llm

    @property
    def engine_started(self) -> bool:
        return self._llm is not None

    @property
    def window(self) -> int:
        return self.model_config.max_position_embeddings

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- records --------------------------------------------------------------------------

    def get(self, ref: str, context: str | None = None) -> ChunkInfo:
        return self.describe(self.registry.find(ref, context))

    def describe(self, chunk: ChunkInfo) -> ChunkInfo:
        """Fill in what only this process knows: whether and where its KV is in the pool."""
        return self.describe_many([chunk])[0]

    def describe_many(self, chunks: list[ChunkInfo]) -> list[ChunkInfo]:
        """`describe` for each chunk; a listing reads its views' sources once, not per view."""
        if not self.engine_started:
            return self._recorded_tiers(chunks)
        with self.lock:  # a generation or a prefetch may change the pool meanwhile
            return [self._pool_state(c) for c in chunks]

    def _recorded_tiers(self, chunks: list[ChunkInfo]) -> list[ChunkInfo]:
        """No pool yet: the tiers recorded, here or before, stand (a view's: its furthest
        source's). Sources not among `chunks` are read in one round trip."""
        known = {c.hash: c for c in chunks}
        wanted = list(dict.fromkeys(h for c in chunks for h in self.owner_hashes(c)))
        if missing := [h for h in wanted if h not in known]:
            known |= {c.hash: c for c in self.registry.get_many(missing)}
        for chunk in chunks:
            owners = self.owner_hashes(chunk)
            tiers = [self.tier_records.latest(h) or known[h].tier for h in owners]
            chunk.tier = farthest_tier(tiers)
            chunk.segments = []
        return chunks

    def _pool_state(self, chunk: ChunkInfo) -> ChunkInfo:
        tiers = [self.tier_of(h) for h in self.owner_hashes(chunk)]
        chunk.tier = farthest_tier(tiers)  # a view: as far as its furthest source
        if chunk.tier != "gpu":
            chunk.segments = []
        elif chunk.layout == "view":  # read straight from the pool: a listing is not a use
            chunk.segments = [
                seg
                for p in self.pieces(chunk)
                for seg in slice_segments(self.kv[p.chunk.hash], p.start, p.length, self.block_size)
            ]
        else:
            chunk.segments = list(self.kv[chunk.hash])
        return chunk

    @staticmethod
    def owner_hashes(chunk: ChunkInfo) -> list[str]:
        return (
            list(dict.fromkeys(s.hash for s in chunk.sources))
            if chunk.layout == "view"
            else [chunk.hash]
        )

    def tier_of(self, chunk_hash: str) -> str:
        if chunk_hash in self.kv:
            return "gpu"
        return "cpu" if chunk_hash in self.host else "disk"

    def token_count(self, hashes: list[str]) -> int:
        """Total tokens of these chunks; counts never change for a hash, so they are cached."""
        missing = [h for h in hashes if h not in self._token_counts]
        for chunk in self.registry.get_many(missing):
            self._token_counts[chunk.hash] = chunk.token_count
        return sum(self._token_counts[h] for h in hashes)

    # -- KV residency -----------------------------------------------------------------------

    def pieces(self, chunk: ChunkInfo) -> list[Piece]:
        if chunk.layout != "view":
            return [Piece(chunk, 0, chunk.token_count)]
        owners = {c.hash: c for c in self.registry.get_many({s.hash for s in chunk.sources})}
        return [Piece(owners[s.hash], s.offset, s.offset + s.length) for s in chunk.sources]

    def segments(self, chunk: ChunkInfo) -> list[KVSegment]:
        """The chunk's KV in the pool, in token order (loaded or recomputed if needed)."""
        return [seg for p in self.pieces(chunk) for seg in self._piece_segments(p)]

    def _piece_segments(self, piece: Piece) -> list[KVSegment]:
        stored = self.ensure_resident(piece.chunk)
        return slice_segments(stored, piece.start, piece.length, self.block_size)

    def ensure_resident(self, chunk: ChunkInfo) -> list[KVSegment]:
        """The pool KV of a chunk that owns KV: already there, else from host memory, else
        from its file, else recomputed from its tokens. Brought back transparently."""
        with self.lock:
            self.lru.touch(chunk.hash)
            if chunk.hash in self.kv:
                self.stats["pool_hits"] += 1
                return self.kv[chunk.hash]
            self.stats["pool_misses"] += 1
            kv = self.host.pop(chunk.hash)
            if kv is None:
                kv = self.load_kv(chunk)
            if kv is None:
                self.kv[chunk.hash] = self._recompute(chunk)
            else:
                self.kv[chunk.hash] = [self.write_pool(*kv, chunk.position)]
            self._record_tier(chunk.hash, "gpu")
            return self.kv[chunk.hash]

    def write_pool(self, k: torch.Tensor, v: torch.Tensor, position: int) -> KVSegment:
        """New pool blocks holding K and V, made room for within the gpu budget."""
        self.make_room(self.llm.block_manager.blocks_needed(0, k.shape[1]))
        return self.llm.write_kv(k, v, position)

    def load_kv(self, chunk: ChunkInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's KV from outside this process's pool and host memory (`fetch_kv`), one
        load per chunk at a time: a generation that needs a chunk that a prefetch is loading
        waits for that load instead of reading the file again. The loader holds no lock."""
        with self._loading_lock:
            pending = self._loading.get(chunk.hash)
            if pending is None:
                self._loading[chunk.hash] = mine = Future()
        if pending is not None:
            return pending.result()
        kv = None
        try:
            kv = self.fetch_kv(chunk)
        finally:
            with self._loading_lock:
                del self._loading[chunk.hash]
            mine.set_result(kv)
        return kv

    def fetch_kv(self, chunk: ChunkInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's KV from its file, if it is there and sound (a store in a shared pool
        asks its peers first)."""
        return self._file_kv(chunk)

    def _file_kv(self, chunk: ChunkInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = kv_path(self.home, chunk.hash)
        if not path.exists():
            return None
        c = self.model_config
        shape = (c.num_layers, chunk.token_count, c.num_kv_heads, c.head_dim)
        try:
            k, v, _, _ = read_kv_file(
                path, self.fingerprint, self.engine_config.dtype, shape, self.host.buffer
            )
        except ChunkFileError:  # a damaged file is never used: the chunk is recomputed instead
            self.stats["bad_files"] += 1
            return None
        self.stats["file_loads"] += 1
        return k, v

    def _recompute(self, chunk: ChunkInfo) -> list[KVSegment]:
        if self.registry.missing([chunk.hash]):  # its file went with it: do not make a new one
            raise ChunkNotFound(f"chunk {chunk.hash[:12]} was deleted meanwhile")
        self.stats["recomputes"] += 1
        try:
            parents = self.registry.get_many(chunk.parent_chunks)
        except ChunkNotFound as e:
            raise ChunkNotFound(
                f"the KV of chunk {chunk.hash[:12]} is lost and cannot be rebuilt: a chunk it "
                f"was computed after is deleted ({e})"
            ) from None
        with self.pinning(parents):
            context = self.context_of(parents, *recorded_combination(chunk))
            try:
                self.make_room(self.llm.block_manager.blocks_needed(0, chunk.token_count))
                result = self.llm.prefill(chunk.token_ids, context.segments, chunk.position)
            finally:
                self.release(context)
        kv_path(self.home, chunk.hash).unlink(missing_ok=True)  # the damaged file, if any
        self._write_file(chunk, [result.segment])
        return [result.segment]

    def read_kv(self, segments: list[KVSegment]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.llm.read_kv(segments)

    def free(self, segments: list[KVSegment]) -> None:
        for seg in segments:
            self.llm.release(seg)

    def evict(self, chunk_hash: str) -> None:
        self.free(self.kv.pop(chunk_hash, []))

    # -- tiers --------------------------------------------------------------------------------

    def owners(self, chunk: ChunkInfo) -> list[ChunkInfo]:
        """The chunks that own the KV a chunk reads: itself, or a view's sources."""
        return list({p.chunk.hash: p.chunk for p in self.pieces(chunk)}.values())

    def move_to_gpu(self, chunk: ChunkInfo) -> None:
        for owner in self.owners(chunk):
            self.ensure_resident(owner)

    def move_to_cpu(self, chunk: ChunkInfo) -> None:
        with self.lock:
            owners = self.owners(chunk)
            for owner in owners:  # refused before anything moves
                nbytes = self._kv_bytes(owner.token_count)
                if nbytes > self.host.budget_bytes:
                    raise CapacityError(
                        f"chunk {owner.hash[:12]} ({nbytes} bytes of KV) does not fit the cpu "
                        f"budget of {self.host.budget_bytes} bytes; archive it to disk instead"
                    )
            for owner in owners:
                if owner.hash in self.kv:
                    self._demote(owner.hash)
                elif owner.hash not in self.host:
                    self._load_into_host(owner)

    def archive_to_disk(self, chunk: ChunkInfo) -> None:
        with self.lock:
            for owner in self.owners(chunk):
                self._drop_to_disk(owner.hash)

    def _drop_to_disk(self, chunk_hash: str) -> None:
        """Keep only the file (which every chunk has since its creation)."""
        if not kv_path(self.home, chunk_hash).exists():  # lost: write it again first
            chunk = self.registry.get(chunk_hash)
            self._write_file(chunk, self.ensure_resident(chunk))
        self.evict(chunk_hash)
        self.host.pop(chunk_hash)
        self.lru.forget(chunk_hash)
        self._record_tier(chunk_hash, "disk")

    def make_room(self, blocks: int) -> None:
        """Free pool blocks for `blocks` new ones within the gpu budget, moving the least
        recently used chunks that nothing needs right now down to the cpu tier."""
        bm = self.llm.block_manager
        budget = min(self.budgets.gpu_blocks or bm.num_blocks, bm.num_blocks)
        protected: set[str] | None = None
        while bm.num_free < blocks or bm.num_blocks - bm.num_free + blocks > budget:
            protected = self._protected() if protected is None else protected
            resident = [*self.kv, *self.compositions]
            victim = next(self.lru.coldest(resident, protected.__contains__), None)
            if victim is None:
                raise CapacityError(
                    f"the gpu tier is full: {blocks} more blocks needed, "
                    f"{bm.num_free} free, budget {budget} of {bm.num_blocks}; every resident "
                    "chunk is active or in use (deactivate some, or raise KVCHUNKS_GPU_BLOCKS)"
                )
            if victim in self.compositions:
                self._drop_composition(victim)
            else:
                self._demote(victim)

    def _protected(self) -> set[str]:
        active = {h for name in self.registry.contexts() for h in self.registry.active(name)}
        views = {c.hash: c for c in self.registry.get_many(active) if c.layout == "view"}
        sources = {s.hash for view in views.values() for s in view.sources}
        return active | sources | {h for h, n in self.pinned.items() if n > 0}

    def _load_into_host(self, chunk: ChunkInfo) -> None:
        """disk -> cpu, for a chunk that fits host memory."""
        nbytes = self._kv_bytes(chunk.token_count)
        self._make_host_room(nbytes)  # first: the chunks it moves out leave it their buffers
        kv = self.load_kv(chunk)
        if kv is None:  # no sound file: computed in the pool, which may fill host memory
            kv = self.llm.read_kv(self.ensure_resident(chunk), self.host.buffer)
            self.evict(chunk.hash)
            self._make_host_room(nbytes)
        self.host.put(chunk.hash, *kv)
        self._record_tier(chunk.hash, "cpu")

    def _demote(self, chunk_hash: str) -> None:
        """gpu -> cpu, or straight to disk (its file) when the chunk cannot fit host memory."""
        segments = self.kv[chunk_hash]
        nbytes = self._kv_bytes(sum(s.length for s in segments))
        fits = nbytes <= self.host.budget_bytes
        kv = self.llm.read_kv(segments, self.host.buffer) if fits else None
        self.evict(chunk_hash)
        self.stats["evictions"] += 1
        if fits:
            self._make_host_room(nbytes)
            self.host.put(chunk_hash, *kv)
        self._record_tier(chunk_hash, "cpu" if fits else "disk")

    def _make_host_room(self, nbytes: int) -> None:
        for victim in self.lru.coldest(list(self.host.kv), lambda h: False):
            if self.host.fits(nbytes):
                return
            self._drop_to_disk(victim)

    def _kv_bytes(self, tokens: int) -> int:
        return self.model_config.kv_bytes(tokens, self.engine_config.torch_dtype)

    def _record_tier(self, chunk_hash: str, tier: str) -> None:
        self.tier_records.record(chunk_hash, tier)

    def restore_tiers(self) -> None:
        """Bring back what was in the gpu and cpu tiers when the store last ran (called when
        the engine starts; a store in a shared pool leaves that to on-demand loading)."""
        for chunk in self.registry.list_chunks():
            if chunk.layout == "view" or chunk.tier == "disk":
                continue
            try:
                if chunk.tier == "gpu":
                    self.ensure_resident(chunk)
                else:
                    self.move_to_cpu(chunk)
            except CapacityError:
                self._record_tier(chunk.hash, "disk")

    # -- prefetch -------------------------------------------------------------------------------

    def on_activate(self, chunk: ChunkInfo, active: list[str]) -> None:
        """`prefetch_for_activation` (a store in a shared pool may hand it to a peer)."""
        self.prefetch_for_activation(chunk, active)

    def prefetch_for_activation(self, chunk: ChunkInfo, active: list[str]) -> None:
        """Bring the activated chunk, and what the prefetch policy expects next, into the pool
        in the background, so the next generation finds them there."""
        if self.engine_started and not self._closed:  # lookups run in the background too
            self._transfers.submit(self._after_activation, chunk, active)

    def _after_activation(self, chunk: ChunkInfo, active: list[str]) -> None:
        for needed in [chunk.hash, *self.prefetch_policy.on_activate(chunk, active)]:
            if self._claim(needed):
                self._prefetch_one(needed)

    def prefetch(self, chunk_hash: str) -> Future | None:
        """Start bringing a chunk's KV into the pool in the background; the future is done
        when it is there (None: it already is)."""
        if chunk_hash in self.kv or self._closed:
            return None
        if self._claim(chunk_hash):
            self._transfers.submit(self._prefetch_one, chunk_hash)
        return self._inflight.get(chunk_hash)

    def _claim(self, chunk_hash: str) -> bool:
        """Mark a transfer as under way; False if one already is, or none is needed."""
        with self._inflight_lock:
            if chunk_hash in self.kv or chunk_hash in self._inflight:
                return False
            self._inflight[chunk_hash] = Future()
            return True

    def _prefetch_one(self, chunk_hash: str) -> None:
        try:
            chunk = self.registry.get(chunk_hash)
            for owner in self.owners(chunk):
                # The file is read without the lock, so it overlaps the engine's compute.
                kv = (
                    None
                    if owner.hash in self.kv or owner.hash in self.host
                    else (self.load_kv(owner))
                )
                with self.lock:
                    if owner.hash in self.kv or self.registry.missing([owner.hash]):
                        continue  # there already, or deleted since the transfer started
                    if kv is not None and owner.hash not in self.host:
                        self.host.put(owner.hash, *kv)
                    self.ensure_resident(owner)
                    self.stats["prefetched"] += 1
        except (CapacityError, ChunkNotFound):
            self.stats["prefetch_skipped"] += 1
        finally:
            with self._inflight_lock:
                self._inflight.pop(chunk_hash).set_result(None)

    def wait_for_transfers(self) -> None:
        """Block until every background transfer queued so far has finished."""
        self.after_transfers(lambda: None).result()

    def after_transfers(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the background once every transfer queued so far has finished."""
        return self._transfers.submit(fn)

    # -- the three modes ----------------------------------------------------------------------

    def timeline_prefix(self, pieces: list[Piece]) -> int:
        """How many leading pieces sit exactly where, and after what, they were computed."""
        layout: list[tuple[str, int, int]] = []
        offset = 0
        for i, piece in enumerate(pieces):
            expected = self._computed_after(piece)
            if _merged(layout) != expected or piece.chunk.position + piece.start != offset:
                return i
            layout.append(piece.key())
            offset += piece.length
        return len(pieces)

    def _computed_after(self, piece: Piece) -> list[tuple[str, int, int]] | None:
        """The layout the piece's KV was computed after; None once a chunk of that layout is
        deleted (no active layout can match it then)."""
        try:
            parents = self.registry.get_many(piece.chunk.parent_chunks)
        except ChunkNotFound:
            return None
        before = [p.key() for parent in parents for p in self.pieces(parent)]
        if piece.start:
            before.append((piece.chunk.hash, 0, piece.start))
        return _merged(before)

    def attention_context(
        self, pieces: list[Piece], mode: str, recompute: float | None = None
    ) -> AttentionContext:
        """What a new chunk computed after `pieces` attends to, in `mode`. The caller hands it
        back with `release` (it may hold derived KV in the pool)."""
        combine = combination(mode, recompute)
        total = sum(p.length for p in pieces)
        prefix = self.timeline_prefix(pieces)
        if prefix == len(pieces):
            return AttentionContext(self._stored(pieces), total, "", reused=total)
        if mode == "reuse":
            end = max(p.chunk.position + p.end for p in pieces)
            return AttentionContext(self._stored(pieces), end, combine, reused=total)
        # pieces[end:] were computed after exactly this composition of pieces[:end] (a
        # conversation continued over it): their stored KV follows the derived KV as it is.
        end = self._continuation_start(pieces, prefix, combine)
        head, tail = self._stored(pieces[:prefix]), self._stored(pieces[end:])
        key, composed, recomputed = self._composition(pieces, prefix, end, combine, head)
        return AttentionContext(
            [*head, composed.segment, *tail],
            total,
            combine,
            reused=total - recomputed,
            recomputed=recomputed,
            held=[key],
        )

    def release(self, ctx: AttentionContext) -> None:
        """The caller no longer attends to ctx: its derived KV may be dropped under pressure."""
        with self.lock:
            self.pinned.subtract(ctx.held)

    def _stored(self, pieces: list[Piece]) -> list[KVSegment]:
        return [seg for p in pieces for seg in self._piece_segments(p)]

    def _continuation_start(self, pieces: list[Piece], prefix: int, combine: str) -> int:
        """Where the trailing pieces that continue the composition before them begin."""
        end, offset = len(pieces), sum(p.length for p in pieces)
        while end > prefix + 1:
            piece = pieces[end - 1]
            offset -= piece.length
            before = _merged([p.key() for p in pieces[: end - 1]])
            continues = (
                piece.chunk.metadata.get("combine") == combine
                and piece.chunk.position + piece.start == offset
                and self._computed_after(piece) == before
            )
            if not continues:
                break
            end -= 1
        return end

    def _composition(
        self, pieces: list[Piece], prefix: int, end: int, combine: str, head: list[KVSegment]
    ) -> tuple[str, Composition, int]:
        """The derived KV of pieces[prefix:end] composed after pieces[:prefix]: kept from an
        earlier call, or made now; pinned for the caller. Returns its key, it, and how many
        tokens were computed now."""
        key = composition_key(_merged([p.key() for p in pieces[:end]]), combine)
        with self.lock:
            recomputed = 0
            if key in self.compositions:
                self.stats["composition_hits"] += 1
            else:
                recomputed = self._compose(key, pieces[prefix:end], combine, head)
            self.lru.touch(key)
            self.pinned[key] += 1
            return key, self.compositions[key], recomputed

    def _compose(self, key: str, parts: list[Piece], combine: str, head: list[KVSegment]) -> int:
        start = sum(s.length for s in head)
        tokens = [t for p in parts for t in p.chunk.token_ids[p.start : p.end]]
        self.make_room(self.llm.block_manager.blocks_needed(0, len(tokens)))
        if combine == "exact":
            segment = self.llm.prefill(tokens, head, start).segment
            chosen = tokens
        else:
            segment = self.llm.place(self._stored(parts), start)
            budget = round(recompute_of(combine) * len(tokens))
            chosen = leading_tokens([p.length for p in parts], budget)
            try:
                self.llm.recompute(segment, tokens, chosen, head)
            except BaseException:
                self.llm.release(segment)
                raise
        self.compositions[key] = Composition(segment, frozenset(p.chunk.hash for p in parts))
        self.stats["composition_tokens_recomputed"] += len(chosen)
        return len(chosen)

    # -- making chunks --------------------------------------------------------------------------

    def new_record(
        self,
        tokens: list[int],
        parents: list[ChunkInfo],
        position: int,
        combine: str,
        mode: str,
        **fields,
    ) -> ChunkInfo:
        """The record of a chunk computed at `position` after `parents`, combined as named."""
        placed = [(p.hash, p.position) for p in parents]
        address = chunk_hash(self.fingerprint, context_hash(placed, combine), position, tokens)
        metadata = {
            "mode": mode,
            "combine": combine,
            "timestamp": time.time(),
            **fields.pop("metadata", {}),
        }
        return ChunkInfo(
            hash=address,
            content_hash=content_hash(tokens),
            token_ids=list(tokens),
            position=position,
            layout="timeline" if parents else "standalone",
            parent_chunks=[p.hash for p in parents],
            metadata=metadata,
            text=fields.pop("text", None) or self.tokenizer.decode(tokens),
            **fields,
        )

    def register(self, chunk: ChunkInfo, segments: list[KVSegment]) -> ChunkInfo:
        """Store a computed chunk: KV file first, then the record. Duplicates are dropped.

        The store owns `segments` from here on; if storing fails (a full disk, Redis gone),
        they are freed and nothing of the chunk is left."""
        written = False
        try:
            if self.registry.exists(chunk.hash):
                self.free(segments)
                return self.get(chunk.hash)
            if chunk.layout != "view":
                self._write_file(chunk, segments)
                written = True
            self.registry.put(dataclasses.replace(chunk, segments=[]))
        except BaseException:
            self.free(segments)
            if written:
                kv_path(self.home, chunk.hash).unlink(missing_ok=True)
            raise
        if chunk.layout != "view":
            if chunk.hash in self.kv:  # a copy from before the chunk was deleted: the same KV
                self.free(segments)
            else:
                self.kv[chunk.hash] = segments
            self.lru.touch(chunk.hash)
        return self.describe(self.registry.get(chunk.hash))

    def _write_file(self, chunk: ChunkInfo, segments: list[KVSegment]) -> None:
        k, v = self.read_kv(segments)
        limit = self.budgets.disk_bytes
        if limit is not None and self.disk_bytes() + k.nbytes + v.nbytes > limit:
            raise CapacityError(
                f"the disk tier is full: {self.disk_bytes()} of {limit} bytes used, chunk needs "
                f"{k.nbytes + v.nbytes}; delete chunks or raise KVCHUNKS_DISK_BYTES"
            )
        record = dataclasses.replace(chunk, segments=[], is_active=False).to_record()
        path = kv_path(self.home, chunk.hash)
        write_kv_file(path, k, v, record, self.fingerprint, self.budgets.disk_compression)

    def context_of(
        self, parents: list[ChunkInfo], mode: str, recompute: float | None = None
    ) -> AttentionContext:
        return self.attention_context([p for c in parents for p in self.pieces(c)], mode, recompute)

    def compute(
        self, tokens: list[int], parents: list[ChunkInfo], mode: str, **fields
    ) -> ChunkInfo:
        """A chunk of `tokens` computed against `parents` in `mode` (or the stored duplicate)."""
        with self.lock, self.pinning(parents):
            ctx = self.context_of(parents, mode)
            try:
                chunk = self.new_record(tokens, parents, ctx.position, ctx.combine, mode, **fields)
                if self.registry.exists(chunk.hash):
                    return self.get(chunk.hash)
                self.make_room(self.llm.block_manager.blocks_needed(0, len(tokens)))
                result = self.llm.prefill(tokens, ctx.segments, ctx.position)
            finally:
                self.release(ctx)
            return self.register(chunk, [result.segment])

    @contextlib.contextmanager
    def pinning(self, chunks: list[ChunkInfo]) -> Iterator[None]:
        """Keep the KV these chunks read in the pool (no eviction) while the block runs."""
        owners = [o.hash for c in chunks for o in self.owners(c)]
        with self.lock:
            self.pinned.update(owners)
        try:
            yield
        finally:
            with self.lock:
                self.pinned.subtract(owners)

    def make_view(self, kind: str, spans: list[SourceSpan], **fields) -> ChunkInfo:
        """A composed or split chunk over other chunks' KV: no copy, sources kept by refcount."""
        owners = {c.hash: c for c in self.registry.get_many({s.hash for s in spans})}
        tokens = [
            t for s in spans for t in owners[s.hash].token_ids[s.offset : s.offset + s.length]
        ]
        placed = [(s.hash, s.offset) for s in spans]
        address = chunk_hash(self.fingerprint, context_hash(placed, kind), 0, tokens)
        if self.registry.exists(address):
            return self.get(address)
        first = owners[spans[0].hash]
        chunk = ChunkInfo(
            hash=address,
            content_hash=content_hash(tokens),
            token_ids=tokens,
            role=first.role,
            kind=kind,
            position=first.position + spans[0].offset,
            layout="view",
            parent_chunks=list(dict.fromkeys(s.hash for s in spans)),
            sources=spans,
            text=self.tokenizer.decode(tokens),
            **fields,
        )
        self.registry.put(chunk)
        for source in chunk.parent_chunks:
            self.registry.add_ref(source, 1)
        return self.describe(self.registry.get(address))

    def delete(self, chunk: ChunkInfo) -> None:
        self.tier_records.flush()  # none may land on a chunk made again with this hash
        self.registry.delete(chunk.hash)
        if chunk.layout == "view":
            for source in chunk.parent_chunks:
                if self.registry.exists(source):
                    self.registry.add_ref(source, -1)
            return
        with self.lock:
            self.drop(chunk.hash)
            kv_path(self.home, chunk.hash).unlink(missing_ok=True)

    def drop(self, chunk_hash: str) -> None:
        """Let go of a chunk's KV in this process: pool blocks, host memory, LRU place, and the
        derived KV made from it."""
        self.evict(chunk_hash)
        self.host.pop(chunk_hash)
        self.lru.forget(chunk_hash)
        for key, composition in list(self.compositions.items()):
            if chunk_hash in composition.sources:
                self._drop_composition(key)

    def _drop_composition(self, key: str) -> None:
        self.llm.release(self.compositions.pop(key).segment)
        self.lru.forget(key)
        self.stats["compositions_dropped"] += 1

    def close(self) -> None:
        """Finish transfers, give the pool blocks back to the engine, disconnect from Redis."""
        self._closed = True
        self._transfers.shutdown(wait=True)
        if self.engine_started:
            with self.lock:
                for resident in list(self.kv):
                    self.evict(resident)
                for key in list(self.compositions):
                    self._drop_composition(key)
        self.tier_records.close()
        close_redis(self._redis)

    def violations(self) -> list[str]:
        """Broken invariants of the registry and of this store (empty: all hold): every
        active chunk's KV can be had, and each pool block is owned exactly as counted."""
        out = registry_violations(self.registry)
        active = {h for name in self.registry.contexts() for h in self.registry.active(name)}
        with self.lock:
            for chunk in self.registry.get_many(active - set(self.registry.missing(active))):
                out += [
                    f"active chunk {chunk.hash[:12]}: KV of {owner.hash[:12]} cannot be loaded"
                    for owner in self.owners(chunk)
                    if owner.hash not in self.kv
                    and owner.hash not in self.host
                    and self._file_kv(owner) is None
                ]
            out += self._pool_violations()
        return out

    def _pool_violations(self) -> list[str]:
        registered = set(self.kv) | set(self.host.kv)
        out = [
            f"chunk {h[:12]}: KV held, but not in the registry"
            for h in sorted(set(self.registry.missing(registered)))
        ]
        out += [
            f"chunk {h[:12]}: KV both in the pool and in host memory"
            for h in sorted(set(self.kv) & set(self.host.kv))
        ]
        if not self.engine_started:
            return out
        bm = self.llm.block_manager
        owned = Counter(b for segments in self.kv.values() for s in segments for b in s.blocks)
        owned.update(b for c in self.compositions.values() for b in c.segment.blocks)
        free = set(bm.free_ids)
        for block in range(bm.num_blocks):
            if bm.ref_counts[block] != owned[block] or (block in free) == bool(owned[block]):
                out.append(
                    f"pool block {block}: ref count {bm.ref_counts[block]}, held by "
                    f"{owned[block]} resident segment(s), {'free' if block in free else 'in use'}"
                )
        return out

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.home / "kv").rglob("*.safetensors"))

    def _fingerprint(self) -> str:
        files = sorted(self.path.glob("*.safetensors"))
        stamp = ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        if stamp not in _DIGESTS:
            cache = self.home / "fingerprints.json"
            known = json.loads(cache.read_text()) if cache.exists() else {}
            if stamp not in known:
                known[stamp] = weights_digest(files)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(known))
            _DIGESTS[stamp] = known[stamp]
        c = self.model_config
        return model_fingerprint(
            c.architecture, _DIGESTS[stamp], self.engine_config.dtype, self.block_size
        )


def _merged(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Adjacent ranges of the same chunk joined, so one layout has one spelling."""
    out: list[tuple[str, int, int]] = []
    for h, start, end in ranges:
        if out and out[-1][0] == h and out[-1][2] == start:
            out[-1] = (h, out[-1][1], end)
        else:
            out.append((h, start, end))
    return out


def recorded_combination(chunk: ChunkInfo) -> tuple[str, float | None]:
    """The mode and recompute fraction a chunk was computed with (records from before the
    combination was recorded name the mode alone)."""
    combine = chunk.metadata.get("combine")
    if combine is None:
        return chunk.metadata.get("mode", "reuse"), None
    return split_combination(combine) if combine else ("reuse", None)


def leading_tokens(lengths: list[int], budget: int) -> list[int]:
    """Which tokens of chunks laid out one after another `realign` recomputes: the first
    ones of each chunk, `budget` in all, shared as evenly as the chunks' lengths allow.

    A chunk computed on its own starts with the tokens every later token leans on (the
    attention sinks of its own start); in a composition they must become ordinary tokens
    that have seen the chunks before them. Measured on bench/fidelity.py, this beat
    choosing the tokens whose KV moves most at an early layer (CacheBlend's rule), at no
    cost for the choice itself (see the README).
    """
    taken = [0] * len(lengths)
    left = min(budget, sum(lengths))
    while left:
        growing = [i for i, n in enumerate(lengths) if taken[i] < n]
        share = max(1, left // len(growing))
        for i in growing:
            more = min(share, lengths[i] - taken[i], left)
            taken[i] += more
            left -= more
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [start + j for start, n in zip(starts, taken, strict=True) for j in range(n)]
