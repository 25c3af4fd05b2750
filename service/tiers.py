"""The pool (`gpu`), host memory (`cpu`) and the chunk files (`disk`): which chunk's KV is
where, the budgets and LRU order that move it down, and the tier records that say so.

A chunk's KV is in at most one of gpu and cpu; every chunk has its file. Derived KV (what a
mode computed for a composition) lives in the pool only: it can always be made again, so
under pressure it is dropped, never moved down.

The model host's lock covers the pool and all of this. A move to host memory (`to_host`)
takes it only to find and retain the chunk's blocks and then to record the move: the copy
out of the pool runs without it (unless the caller holds it), so generation steps go on
meanwhile. A move that makes room for new KV runs under it, as the blocks must be free
before they are allocated; when only the blocks a copy holds would make the room, it waits
for that copy (which needs no lock) and finishes its move itself. A move to disk runs under
it too: it checks the file, and copies KV only to write a lost or damaged file again.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from kvchunks.common import CapacityError
from kvchunks.engine.kv_segment import KVSegment
from kvchunks.policies.budgets import TierBudgets
from kvchunks.policies.lru import LRU
from kvchunks.service.chunk_files import ChunkFiles
from kvchunks.service.kv_sources import KV, KVLoader
from kvchunks.service.model_host import ModelHost
from kvchunks.service.node_memory import NodeMemory
from kvchunks.service.pins import Pins
from kvchunks.store.chunk import ChunkInfo, ChunkRecord
from kvchunks.store.host_memory import HostMemory
from kvchunks.store.registry import ChunkRegistry
from kvchunks.store.tier_records import TierRecords


@dataclass
class Composition:
    """Derived KV: chunks computed apart, placed one after another and partly or wholly
    recomputed in that order; it goes when a chunk it was made from is deleted."""

    segment: KVSegment
    sources: frozenset[str]  # the chunks (owning KV) it was made from


@dataclass(eq=False)
class HostCopy:
    """A move to host memory whose copy out of the pool runs without the lock. Whoever holds
    the lock first once the copy has ended finishes the move: the copying thread, or a
    `make_room` that needs the blocks the copy holds and waited for it."""

    chunk_hash: str
    segments: list[KVSegment]  # retained for the copy
    kv: KV | None = None  # the copy; None if it did not fit host memory (then: its file)
    copied: bool = False  # False: the copy was interrupted, the chunk stays in the pool
    ended: bool = False  # set under Tiers.copy_ended


class Tiers:
    def __init__(
        self,
        model: ModelHost,
        registry: ChunkRegistry,
        files: ChunkFiles,
        host: HostMemory,
        loader: KVLoader,
        budgets: TierBudgets,
        lock: threading.RLock,
        stats: Counter[str],
        node_memory: NodeMemory | None = None,  # instead of host memory (a shared pool)
    ):
        self.model, self.registry, self.files, self.host = model, registry, files, host
        self.loader, self.budgets, self.lock, self.stats = loader, budgets, lock, stats
        self.node_memory = node_memory
        self.kv: dict[str, list[KVSegment]] = {}  # resident KV of chunks that own KV
        self.compositions: dict[str, Composition] = {}  # derived KV by composition key
        self.opening: list[KVSegment] | None = None  # ModelHost's opening, once computed
        self.lru = LRU()
        self.pins = Pins(registry, lock)  # what running work reads
        self.prefetched: set[str] = set()  # brought in ahead of use, not used yet
        self.records = TierRecords(registry)
        self.copies: list[HostCopy] = []  # moves to host memory whose copy is running
        self.copy_ended = threading.Condition()  # notified as each of them ends

    def tier_of(self, chunk_hash: str) -> str:
        if chunk_hash in self.kv:
            return "gpu"
        return "cpu" if chunk_hash in self.host else "disk"

    # -- the pool -----------------------------------------------------------------------

    def bring_in(self, chunk: ChunkInfo) -> list[KVSegment] | None:
        """The pool KV of a chunk that owns KV: already there, else from host memory, else
        from a KV source. None: no copy anywhere, it must be recomputed."""
        with self.lock:
            self.lru.touch(chunk.hash)
            if chunk.hash in self.kv:
                self.stats["pool_hits"] += 1
                if chunk.hash in self.prefetched:
                    self.prefetched.discard(chunk.hash)
                    self.stats["prefetch_hits"] += 1
                return self.kv[chunk.hash]
            self.stats["pool_misses"] += 1
            held = self.host.pop(chunk.hash)  # taken, so that making room cannot spill it
            kv = held if held is not None else self.loader.load(chunk)
            if kv is None:
                return None
            try:
                segment = self.write(*kv, chunk)
            except BaseException:
                if held is not None:  # still the chunk's only copy in host memory
                    self.host.put(chunk.hash, *held)
                raise
            return self.adopt(chunk.hash, [segment])

    def adopt(
        self, chunk_hash: str, segments: list[KVSegment], record: bool = True
    ) -> list[KVSegment]:
        """Make `segments` (whose references the caller hands over) the chunk's pool KV;
        `record` the move (a new chunk's record says gpu already)."""
        with self.lock:
            if chunk_hash in self.kv:  # a copy from before the chunk was deleted: the same KV
                self.free(segments)
            else:
                self.kv[chunk_hash] = segments
            self.lru.touch(chunk_hash)
            if record:
                self.records.record(chunk_hash, "gpu")
            return self.kv[chunk_hash]

    def write(self, k: torch.Tensor, v: torch.Tensor, chunk: ChunkRecord) -> KVSegment:
        """The chunk's K and V in the pool, made room for within the gpu budget."""
        self.make_room_for(k.shape[1], chunk.packs)
        return self.model.llm.write_kv(k, v, chunk.position, chunk.packs)

    def opening_kv(self) -> list[KVSegment]:
        """The KV of the model's opening (ChatFormat.opening), which every context starts
        with: computed when the engine starts, held out of the LRU's reach until release_all."""
        with self.lock:
            if self.opening is None:
                tokens = self.model.chat.opening
                self.opening = [self.model.llm.prefill(tokens, [], 0).segment] if tokens else []
            return self.opening

    def free(self, segments: list[KVSegment]) -> None:
        for seg in segments:
            self.model.llm.release(seg)

    def evict(self, chunk_hash: str) -> None:
        self.free(self.kv.pop(chunk_hash, []))
        self.prefetched.discard(chunk_hash)

    def make_room_for(self, num_tokens: int, pack: bool) -> None:
        """Room for num_tokens new tokens of KV, packed or in new blocks.

        Moving chunks out may free the block a packed chunk would have started in, and then
        it needs one block more: ask again until the answer stays the same."""
        need = None
        while need != (need := self.model.llm.blocks_for(num_tokens, pack=pack)):
            self.make_room(need)

    def make_room(self, blocks: int) -> None:
        """Free pool blocks for `blocks` new ones within the gpu budget, moving the least
        recently used chunks that nothing needs right now down to the cpu tier.

        Packed chunks share blocks, and a block is free only once all of them are gone, so
        the chunks to move are chosen first: the fewest least recently used whose leaving
        frees enough blocks. A pool that cannot make room moves nothing."""
        llm = self.model.llm
        pool = llm.pool_usage()
        budget = min(self.budgets.gpu_blocks or pool["blocks"], pool["blocks"])  # None: all
        # The opening's block is the engine's fixed cost, not the gpu tier's: outside the budget.
        opening = sum(len(s.blocks) for s in self.opening or [])
        used = pool["blocks"] - pool["free"] - opening
        short = max(blocks - pool["free"], used + blocks - budget)
        if short <= 0:
            return
        protected = self._protected()
        coldest = self.lru.coldest([*self.kv, *self.compositions], protected.__contains__)
        victims = llm.fewest_to_release(((h, self._pool_kv(h)) for h in coldest), short)
        if victims is None and self.copies:  # their blocks come free when they end
            self._finish_copies()
            return self.make_room(blocks)
        if victims is None:
            raise CapacityError(
                f"the gpu tier is full: {blocks} more blocks needed, {pool['free']} free, "
                f"budget {budget} of {pool['blocks']}; the resident chunks that are not "
                "active or in use do not free enough blocks (deactivate some, or raise "
                "KVCHUNKS_GPU_BLOCKS)"
            )
        for victim in victims:
            if victim in self.compositions:
                self.drop_composition(victim)
            else:
                self.demote(victim)

    def _pool_kv(self, key: str) -> list[KVSegment]:
        """The pool KV of a resident chunk or composition."""
        return self.kv[key] if key in self.kv else [self.compositions[key].segment]

    def _protected(self) -> set[str]:
        active = self.registry.active_anywhere()
        views = [c for c in self.registry.get_present(active) if c.layout == "view"]
        sources = {s.hash for view in views for s in view.sources}
        return active | sources | self.pins.held()

    # -- derived KV -----------------------------------------------------------------------

    def add_composition(self, key: str, composition: Composition) -> None:
        self.compositions[key] = composition

    def drop_composition(self, key: str) -> None:
        self.model.llm.release(self.compositions.pop(key).segment)
        self.lru.forget(key)
        self.stats["compositions_dropped"] += 1

    # -- moves down -----------------------------------------------------------------------

    def demote(self, chunk_hash: str) -> None:
        """gpu -> cpu, or straight to disk (its file) when the chunk cannot fit host memory."""
        self._moved_out(chunk_hash, self._host_copy(self.kv[chunk_hash]))

    def _host_copy(self, segments: list[KVSegment]) -> KV | None:
        """A copy of the segments' KV in host memory; None if it cannot fit there."""
        if self._nbytes(segments) > self.host.budget_bytes:
            return None
        return self.model.llm.read_kv(segments, self.host.buffer)

    def _moved_out(self, chunk_hash: str, kv: KV | None) -> None:
        """Free the chunk's pool blocks; its KV stays in host memory (kv) or its file (None)."""
        nbytes = self._nbytes(self.kv[chunk_hash])
        self.evict(chunk_hash)
        self.stats["evictions"] += 1
        kept = kv is not None and self._keep_in_host(chunk_hash, kv, nbytes)
        self.records.record(chunk_hash, "cpu" if kept else "disk")

    def _nbytes(self, segments: list[KVSegment]) -> int:
        return self.model.kv_bytes(sum(s.length for s in segments))

    def _keep_in_host(self, chunk_hash: str, kv: KV, nbytes: int) -> bool:
        if self.node_memory is not None:
            spilled = self.node_memory.spill(chunk_hash, *kv)
            for dropped, copy in spilled.dropped.items():
                self._dropped_from_node(dropped, copy)
            return spilled.kept
        self._make_host_room(nbytes)
        self.host.put(chunk_hash, *kv)
        return True

    def to_host(self, chunk: ChunkInfo) -> bool:
        """Keep the chunk's KV in host memory (from the pool, or from a KV source); False if
        there is no copy of it anywhere (recompute it first).

        From the pool, the KV is copied out without the lock, so that generations go on
        meanwhile: a stored chunk's slots are never written again. A chunk deleted or moved
        by someone else meanwhile keeps what they made of it."""
        with self.lock:
            segments = self.kv.get(chunk.hash)
            if segments is None:
                return self._load_to_host(chunk)
            for segment in segments:  # kept from being freed and reused while they are read
                self.model.llm.retain(segment)
            copy = HostCopy(chunk.hash, segments)
            self.copies.append(copy)
        try:
            copy.kv = self._host_copy(segments)
            copy.copied = True
        finally:
            with self.copy_ended:
                copy.ended = True
                self.copy_ended.notify_all()
            with self.lock:
                self._finish(copy)
        return True

    def _finish_copies(self) -> None:
        """Wait for the running copies to host memory (lock held: they need none) and finish
        their moves, freeing the blocks they held."""
        with self.copy_ended:
            self.copy_ended.wait_for(lambda: all(copy.ended for copy in self.copies))
        for copy in list(self.copies):
            self._finish(copy)

    def _finish(self, copy: HostCopy) -> None:
        """Record an ended copy's move and give back its blocks, unless done already."""
        if copy not in self.copies:
            return
        self.copies.remove(copy)
        if copy.copied and self.kv.get(copy.chunk_hash) == copy.segments:
            self._moved_out(copy.chunk_hash, copy.kv)
        self.free(copy.segments)

    def _load_to_host(self, chunk: ChunkInfo) -> bool:
        """to_host for a chunk that is not in the pool (called with the lock held)."""
        if chunk.hash in self.host:
            return True
        nbytes = self.model.kv_bytes(chunk.token_count)
        if self.node_memory is None:  # first: the chunks it moves out leave it their buffers
            self._make_host_room(nbytes)
        kv = self.loader.load(chunk)
        if kv is None:
            return False
        if self._keep_in_host(chunk.hash, kv, nbytes):
            self.records.record(chunk.hash, "cpu")
            self.lru.touch(chunk.hash)  # asked for now: not the first to go back to disk
        return True

    def to_disk(self, chunk_hash: str) -> bool:
        """Keep only the file (written again if lost or damaged); False: no KV to write it from.
        Under the file's lock, as a delete is: one elsewhere ends before this or after it."""
        with self.lock, self.files.claimed(chunk_hash):
            chunk = self.registry.get(chunk_hash)  # ChunkNotFound: deleted, its file with it
            held = chunk_hash in self.kv or chunk_hash in self.host
            # Read and checked while a copy can replace it (in a shared pool, maybe only the
            # node's HostStore or a peer has one): later damage shows only so.
            if held or self.node_memory is not None:
                copy = (
                    partial(self._held_kv, chunk_hash) if held else partial(self.loader.load, chunk)
                )
                if not self.files.repair(chunk, copy):
                    return False
            elif not self.files.exists(chunk_hash):
                return False
            self.evict(chunk_hash)
            self.host.pop(chunk_hash)
            self.lru.forget(chunk_hash)
            if self.node_memory is not None:  # the file is sound: the node's copy can go
                self.node_memory.unspill(chunk_hash)
            self.records.record(chunk_hash, "disk")
            return True

    def _dropped_from_node(self, chunk_hash: str, copy: Callable[[ChunkInfo], KV | None]) -> None:
        """The node's memory let go of a chunk to make room: it is in disk now, its file
        checked (written again from `copy` if it was damaged), as a local move to disk does."""
        with self.files.claimed(chunk_hash):
            present = self.registry.get_present([chunk_hash])  # none: deleted meanwhile
            if present and chunk_hash not in self.kv:
                self.files.repair(present[0], partial(copy, present[0]))  # else: recomputed
                self.records.record(chunk_hash, "disk")

    def kv_of(self, chunk: ChunkInfo) -> KV | None:
        """The chunk's KV from wherever it is kept (pool: a copy), moving nothing between
        tiers; None if there is no copy anywhere."""
        with self.lock:
            held = self._held_kv(chunk.hash)
        return held if held is not None else self.loader.load(chunk)

    def _held_kv(self, chunk_hash: str) -> KV | None:
        if chunk_hash in self.kv:
            return self.model.llm.read_kv(self.kv[chunk_hash])
        return self.host.kv.get(chunk_hash)

    def _make_host_room(self, nbytes: int) -> None:
        for victim in self.lru.coldest(list(self.host.kv), lambda h: False):
            if self.host.fits(nbytes):
                return
            self.to_disk(victim)

    def forget(self, chunk_hash: str) -> None:
        """Let go of a deleted chunk in this process: pool blocks, host memory, LRU place,
        tier records not yet written, and the derived KV made from it."""
        with self.lock:
            self.records.forget(chunk_hash)
            self.evict(chunk_hash)
            self.host.pop(chunk_hash)
            self.lru.forget(chunk_hash)
            for key, composition in list(self.compositions.items()):
                if chunk_hash in composition.sources:
                    self.drop_composition(key)

    # -- end --------------------------------------------------------------------------------

    def release_all(self) -> None:
        """Give every pool block back to the engine."""
        if self.model.started:
            with self.lock:
                self.free(self.opening or [])
                self.opening = None
                for resident in list(self.kv):
                    self.evict(resident)
                for key in list(self.compositions):
                    self.drop_composition(key)
