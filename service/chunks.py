"""Making and deleting chunks: the record of a chunk computed after others, storing it (KV
file first, then the record), views that read other chunks' KV, and deletion."""

from __future__ import annotations

import contextlib
import functools
import graphlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgpack
from transformers import PreTrainedTokenizerBase

from kvchunks.common import ChunkInUse, ChunkNotFound, InvalidInput
from kvchunks.engine.kv_segment import KVSegment
from kvchunks.service.compose import Composer
from kvchunks.service.pieces import cut, spans
from kvchunks.service.tiers import Tiers
from kvchunks.store.chunk import ChunkInfo, ChunkRecord, SourceSpan
from kvchunks.store.hashing import chunk_hash, content_hash, context_hash
from kvchunks.store.registry import ChunkRegistry

# The metadata keys kvchunks records with every chunk (how it was computed, read to compute
# it again and to refuse another dtype's KV); a caller's metadata may not set them.
OWN_METADATA = ("mode", "combine", "timestamp", "dtype")


def chunk_address(
    fingerprint: str, parents: list[ChunkRecord], combine: str, position: int, tokens: list[int]
) -> str:
    """The content address of a chunk computed at `position` after `parents`, combined as
    named (see store.hashing)."""
    placed = [(p.hash, p.position) for p in parents]
    return chunk_hash(fingerprint, context_hash(placed, combine), position, tokens)


def check_metadata(metadata: object) -> dict:
    """A caller's metadata for a new chunk, or InvalidInput saying what is wrong with it."""
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput("metadata must be a mapping with text keys")
    own = [k for k in OWN_METADATA if k in metadata]
    if own:
        raise InvalidInput(f"metadata key(s) {', '.join(own)} are kvchunks' own: use other names")
    try:
        msgpack.packb(metadata)
        # Shown as JSON (--json, HTTP): no NaN or infinity, no bytes.
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError, OverflowError) as e:
        reason = f"metadata values must be plain data (text, finite numbers, lists): {e}"
        raise InvalidInput(reason) from None
    return metadata


@dataclass
class Hold:
    """The chunks one running call has made or found, in the order it took them, and those
    it stores as its own (`kept`). Its holds are in the registry, under `holder`."""

    holder: str
    hashes: list[str] = field(default_factory=list)
    kept: set[str] = field(default_factory=set)


class ChunkMaker:
    def __init__(
        self,
        registry: ChunkRegistry,
        tiers: Tiers,
        composer: Composer,
        fingerprint: str,
        tokenizer: PreTrainedTokenizerBase,
        lock: threading.RLock,
        holder_name: str,
    ):
        self.registry, self.tiers, self.composer = registry, tiers, composer
        self.fingerprint, self.tokenizer, self.lock = fingerprint, tokenizer, lock
        self.holder_name = holder_name  # each call's holds are named after it (see holding)
        self.dtype = tiers.model.engine_config.dtype  # recorded: chunks of dtypes never mix

    def new_record(
        self,
        tokens: list[int],
        parents: list[ChunkRecord],
        position: int,
        combine: str,
        mode: str,
        **fields,
    ) -> ChunkRecord:
        """The record of a chunk computed at `position` after `parents`, combined as named."""
        address = chunk_address(self.fingerprint, parents, combine, position, tokens)
        metadata = {
            **fields.pop("metadata", {}),
            # kvchunks' own keys (OWN_METADATA) last: they win over any other's.
            "mode": mode,
            "combine": combine,
            "timestamp": time.time(),
            "dtype": self.dtype,
        }
        return ChunkRecord(
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

    def register(
        self, chunk: ChunkRecord, segments: list[KVSegment], hold: Hold | None = None
    ) -> ChunkInfo:
        """Store a computed chunk: KV file first, then the record. Returns the stored record
        (an earlier one for a duplicate). Made by a call that holds it (`hold`, the call's),
        it is taken back when the call lets go of it unless the call keeps it, even if the
        call's process is killed first (see ChunkRegistry.put).

        The store owns `segments` from here on; if storing fails (a full disk, Redis gone),
        they are freed and nothing of the chunk is left."""
        tiers = self.tiers
        written = False
        owns_kv = chunk.layout != "view"
        # The file's lock, so that another process deleting this chunk (record, then file)
        # cannot remove the file written here.
        with tiers.files.claimed(chunk.hash) if owns_kv else contextlib.nullcontext():
            try:
                if self.registry.exists(chunk.hash):
                    tiers.free(segments)
                    return self.registry.get(chunk.hash)
                if owns_kv:
                    tiers.files.write(chunk, *tiers.model.llm.read_kv(segments))
                    written = True
                tier = "gpu" if owns_kv else None
                self.registry.put(chunk, tier, made_by_call=hold is not None)
            except BaseException:
                tiers.free(segments)
                if written:
                    tiers.files.remove(chunk.hash)
                raise
        if owns_kv:
            tiers.adopt(chunk.hash, segments, record=False)
        return self.registry.get(chunk.hash)

    def compute(
        self,
        tokens: list[int],
        parents: list[ChunkInfo],
        mode: str,
        recompute: float | None = None,
        hold: Hold | None = None,
        **fields,
    ) -> tuple[ChunkInfo, bool]:
        """A chunk of `tokens` computed against `parents` in `mode`, and True; or the stored
        duplicate, and False. With a hold, the call holds the chunk before anyone else may
        take it back."""
        llm = self.tiers.model.llm
        with self.lock, self.tiers.pins.pinning(parents):
            ctx = self.composer.context_of(parents, mode, recompute)
            try:
                chunk = self.new_record(tokens, parents, ctx.position, ctx.combine, mode, **fields)
                if hold is not None:  # before it is looked for: see `hold`
                    self.hold(hold, [chunk.hash])
                found = self.registry.exists(chunk.hash)
                if not found:
                    self.tiers.make_room_for(len(tokens), chunk.packs)
                    result = llm.prefill(tokens, ctx.segments, ctx.position, pack=chunk.packs)
            finally:
                self.composer.release(ctx)
            stored = (
                self.registry.get(chunk.hash)
                if found
                else self.register(chunk, [result.segment], hold)
            )
            return stored, not found

    def make_view(self, kind: str, spans: list[SourceSpan], **fields) -> ChunkInfo:
        """A composed or split chunk over other chunks' KV: no copy, sources kept by refcount
        (counted by the registry as it stores the view). A view made before (perhaps by a
        concurrent call) only takes the tags given now."""
        owners = {c.hash: c for c in self.registry.get_many({s.hash for s in spans})}
        tokens = [
            t for s in spans for t in owners[s.hash].token_ids[s.offset : s.offset + s.length]
        ]
        placed = [(s.hash, s.offset) for s in spans]
        address = chunk_hash(self.fingerprint, context_hash(placed, kind), 0, tokens)
        sources = list(dict.fromkeys(s.hash for s in spans))
        first = owners[spans[0].hash]
        made = not self.registry.exists(address) and self.registry.put(
            ChunkRecord(
                hash=address,
                content_hash=content_hash(tokens),
                token_ids=tokens,
                role=first.role,
                kind=kind,
                position=first.position + spans[0].offset,
                layout="view",
                parent_chunks=sources,
                sources=spans,
                text=self.tokenizer.decode(tokens),
                metadata={"dtype": self.dtype},
                **fields,
            )
        )
        if not made:
            for tag in fields.get("tags", []):
                self.registry.add_tag(address, tag)
        return self.registry.get(address)

    def split(self, chunk: ChunkInfo, at: int) -> tuple[ChunkInfo, ChunkInfo]:
        """Two views of the chunk, split before token `at`."""
        parts = spans(chunk)
        head = self.make_view("split", cut(parts, 0, at))
        return head, self.make_view("split", cut(parts, at, chunk.token_count))

    def delete(self, chunks: list[ChunkInfo], cascade: bool = False) -> list[str]:
        """Delete chunks for good, all or none: a view over one of them that is not among
        them refuses the lot, unless cascade (which deletes such views first). Returns the
        hashes deleted."""
        named = {c.hash for c in chunks}
        for chunk in chunks if not cascade else []:
            views = [v.hash[:12] for v in self._views(chunk) if v.hash not in named]
            if views:
                raise ChunkInUse(
                    f"chunk {chunk.hash[:12]} is used by view(s) {', '.join(views)}; delete "
                    "them first or delete with cascade=True (--cascade)"
                )
        deleted: list[str] = []
        for chunk in sorted(chunks, key=lambda c: c.layout != "view"):  # views before sources
            if chunk.hash not in deleted:
                deleted += self._delete_with_views(chunk)
        return deleted

    @contextlib.contextmanager
    def holding(self) -> Iterator[Hold]:
        """A call's hold on the chunks it makes or finds (`hold`), in the registry, so that
        it holds across the processes and workers that share it. A chunk taken back while a
        call holds it goes when the last holder lets go, unless a holder stored it as its
        own (`keep`) or it is used by then."""
        hold = Hold(f"{self.holder_name}:{uuid.uuid4().hex}")
        try:
            yield hold
        finally:
            # Newest first, as take_back goes: what was computed after a chunk goes first.
            self._let_go(hold.holder, list(dict.fromkeys(hold.hashes))[::-1], hold.kept)

    def let_go_of_earlier_life(self) -> None:
        """Let go of what calls held under this store's name when its process died: a
        worker started again after a crash (a store without a name of its own has a new
        one in each process, and nothing to let go of)."""
        self._let_go_of_stores([self.holder_name])

    def let_go_of_lapsed_stores(self) -> None:
        """Let go of what the calls of stores whose lease has lapsed held: their process was
        killed mid-call (see StoreLease)."""
        lapsed = [name for name in self.registry.lapsed_stores() if name != self.holder_name]
        if lapsed:
            self._let_go_of_stores(lapsed)
            for name in lapsed:
                self.registry.forget_store(name)

    def _let_go_of_stores(self, names: list[str]) -> None:
        """Each dead call's chunks newest first, as the call itself would have let go of
        them; then the chunks a call let go of but died before taking back (a live call
        taking one back meanwhile makes the same delete)."""
        calls: dict[str, list[str]] = {}
        for holder, held in self.registry.holds_of(names):
            calls.setdefault(holder, []).append(held)
        for holder, hashes in calls.items():
            self._let_go(holder, self._newest_first(hashes), set())
        orphans = self._newest_first(self.registry.orphan_marks())
        for chunk in self.registry.get_present(orphans):
            self._take_back_one(chunk, marked=True)

    def _newest_first(self, hashes: list[str]) -> list[str]:
        """Chunks each before those it was computed after (one not stored: first), as
        take_back goes."""
        stored = _parents_first(self.registry.get_present(hashes))[::-1]
        gone = set(hashes) - set(stored)
        return [*(h for h in hashes if h in gone), *stored]

    def _let_go(self, holder: str, left: list[str], kept: set[str]) -> None:
        """Let go of a call's holds in the order given, taking back each chunk a take-back
        marked that nobody holds then, before letting go of the next. A take-back that
        fails does not stop it, as the call's other holds must not outlive it: the first
        failure is raised at the end."""
        failed: BaseException | None = None
        while left:
            unwanted = self.registry.let_go(holder, left, kept)
            if unwanted is None:
                break
            left = left[left.index(unwanted) + 1 :]
            try:
                for chunk in self.registry.get_present([unwanted]):
                    self._take_back_one(chunk, marked=True)
            except BaseException as e:  # Ctrl-C too: it is raised once all are let go
                failed = failed or e
        if failed is not None:
            raise failed

    def hold(self, hold: Hold, hashes: list[str]) -> None:
        """Add chunks to the call's hold; called before the call looks them up, so that a
        take-back that deletes one does so before the call finds it. Named in the call's
        hold first: a hold whose reply is lost (Ctrl-C, a failed call) is let go too."""
        if hashes:
            hold.hashes += hashes
            self.registry.hold(hold.holder, hashes)

    def hold_lineage(self, hold: Hold, chunks: list[ChunkInfo]) -> None:
        """Add to the call's hold the chunks these held ones were computed after, and theirs
        in turn. Held, such a chunk that a call keeping nothing takes back goes after the
        held chunk computed after it; not held, it would see that chunk, stay, and be left
        behind once that chunk went. Named in the hold before they are read. The call lets
        go of them after the chunks computed after them: they take the front of its hold,
        parents first."""
        seen, lineage = set(hold.hashes), []
        parents = _parents_not_in(chunks, seen)
        while parents:
            self.hold(hold, parents)  # a parent deleted since (its children name it) too
            seen.update(parents)
            found = self.registry.get_present(parents)
            lineage += found
            parents = _parents_not_in(found, seen)
        hold.hashes[:] = list(dict.fromkeys([*_parents_first([*chunks, *lineage]), *hold.hashes]))

    def keep(self, hold: Hold, chunks: list[ChunkRecord]) -> None:
        """The call stores these chunks, which it holds, as its own: they are not taken back
        (recorded as the call lets go; until then its hold defers any take-back)."""
        hold.kept.update(c.hash for c in chunks)

    def take_back(self, chunks: list[ChunkInfo]) -> None:
        """Delete chunks a call made, one by one in the order given (newest first). One that
        a running call holds goes when the last holder lets go. One that meanwhile someone
        else deleted, stored as its own, computed a chunk or a view after, or activated, is
        no longer the call's alone, and stays."""
        for chunk in chunks:
            self._take_back_one(chunk)

    def _take_back_one(self, chunk: ChunkInfo, marked: bool = False) -> None:
        with contextlib.suppress(ChunkNotFound):
            self._delete_one(chunk, functools.partial(self.registry.take_back, marked=marked))

    def _views(self, chunk: ChunkInfo) -> list[ChunkInfo]:
        children = self.registry.get_many(self.registry.children(chunk.hash))
        return [c for c in children if c.layout == "view"]

    def _delete_with_views(self, chunk: ChunkInfo) -> list[str]:
        deleted = [h for view in self._views(chunk) for h in self._delete_with_views(view)]
        self._delete_one(chunk, self._delete_record)
        return [*deleted, chunk.hash]

    def _delete_record(self, chunk_hash: str) -> bool:
        self.registry.delete(chunk_hash)
        return True

    def _delete_one(self, chunk: ChunkInfo, unregister: Callable[[str], bool]) -> None:
        """Delete the chunk's record with `unregister` (which says whether it went), then
        its KV and file."""
        # Under the locks that making a chunk holds (this process's, and the file's for the
        # other processes on the data directory): the same chunk made again between the
        # record's delete and the KV's would lose its new KV and file.
        if chunk.layout == "view":  # no KV: the registry takes back its references
            with self.lock:
                unregister(chunk.hash)
            return
        with self.lock, self.tiers.files.claimed(chunk.hash):
            self.tiers.records.flush()  # none may land on a chunk made again with this hash
            if unregister(chunk.hash):
                self.tiers.forget(chunk.hash)
                self.tiers.files.remove(chunk.hash)


def _parents_first(chunks: list[ChunkInfo]) -> list[str]:
    """The chunks' hashes, each after those among them it was computed after: by provenance,
    not by the records' clocks (workers' clocks may differ)."""
    present = {c.hash for c in chunks}
    graph = {c.hash: [p for p in c.parent_chunks if p in present] for c in chunks}
    return list(graphlib.TopologicalSorter(graph).static_order())


def _parents_not_in(chunks: list[ChunkInfo], seen: set[str]) -> list[str]:
    return list(dict.fromkeys(p for c in chunks for p in c.parent_chunks if p not in seen))
