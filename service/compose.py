"""The three modes' layout: what a new chunk computed after some pieces of stored KV attends
to, and where its tokens go.

When the pieces are one timeline (each sits exactly where, and after what, it was computed)
every mode reads them as stored. Otherwise `reuse` still does; `exact` and `realign` make
derived KV for the part that is not (a Composition, kept in the pool by the tiers), unless an
earlier call made it already.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from kvchunks.common import ChunkNotFound
from kvchunks.engine.kv_segment import KVSegment
from kvchunks.service.chunk_files import ChunkFiles
from kvchunks.service.model_host import ModelHost
from kvchunks.service.pieces import Piece, merged, pieces
from kvchunks.service.tiers import Composition, Tiers
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.hashing import composition_key
from kvchunks.store.registry import ChunkRegistry
from kvchunks.vocabulary import combination, recompute_of, split_combination


@dataclass
class AttentionContext:
    """What a new chunk attends to, and where its tokens go."""

    segments: list[KVSegment]
    position: int
    combine: str  # "" when the context is one timeline (all modes agree), else its name
    reused: int = 0  # context tokens whose KV was used as it was stored or derived before
    recomputed: int = 0  # context tokens whose KV was computed for this context now
    held: list[str] = field(default_factory=list)  # derived KV pinned until `release`


class Composer:
    def __init__(
        self,
        model: ModelHost,
        registry: ChunkRegistry,
        tiers: Tiers,
        files: ChunkFiles,
        lock: threading.RLock,
        stats: Counter[str],
    ):
        self.model, self.registry, self.tiers, self.files = model, registry, tiers, files
        self.lock, self.stats = lock, stats

    # -- stored KV ------------------------------------------------------------------------

    def owned_kv(self, chunk: ChunkInfo) -> list[KVSegment]:
        """The pool KV of a chunk that owns KV, brought back transparently: from host memory,
        a KV source, or recomputed from its tokens after its parents."""
        with self.lock:
            stored = self.tiers.bring_in(chunk)
            if stored is None:
                stored = self.tiers.adopt(chunk.hash, self._rebuild(chunk))
            return stored

    def segments(self, chunk: ChunkInfo) -> list[KVSegment]:
        """The chunk's KV in the pool, in token order (loaded or recomputed if needed)."""
        return self.stored(pieces(self.registry, chunk))

    def stored(self, parts: list[Piece]) -> list[KVSegment]:
        llm = self.model.llm
        return [seg for p in parts for seg in llm.slice(self.owned_kv(p.chunk), p.start, p.length)]

    def _rebuild(self, chunk: ChunkInfo) -> list[KVSegment]:
        """Compute a chunk's KV again, in the context it was computed in, and its file."""
        self.model.check_dtype([chunk])  # else another dtype's file would be overwritten
        self._check_not_deleted(chunk)
        self.stats["recomputes"] += 1
        try:
            parents = self.registry.get_many(chunk.parent_chunks)
        except ChunkNotFound as e:
            raise ChunkNotFound(
                f"the KV of chunk {chunk.hash[:12]} is lost and cannot be rebuilt: a chunk it "
                f"was computed after is deleted ({e})"
            ) from None
        llm = self.model.llm
        with self.tiers.pins.pinning(parents):
            context = self.context_of(parents, *recorded_combination(chunk))
            try:
                if context.position != chunk.position:  # computed before the opening was
                    raise ChunkNotFound(
                        f"the KV of chunk {chunk.hash[:12]} is lost and cannot be rebuilt: it "
                        "was computed without the model's opening; load its text again"
                    )
                self.tiers.make_room_for(chunk.token_count, chunk.packs)
                segment = llm.prefill(
                    chunk.token_ids, context.segments, chunk.position, pack=chunk.packs
                ).segment
            finally:
                self.release(context)
        try:
            with self.files.claimed(chunk.hash):  # a delete elsewhere waits, or has ended
                self._check_not_deleted(chunk)
                self.files.remove(chunk.hash)  # the damaged file, if any
                self.files.write(chunk, *llm.read_kv([segment]))
        except BaseException:  # no room on disk, say: the KV is nobody's yet
            llm.release(segment)
            raise
        return [segment]

    def _check_not_deleted(self, chunk: ChunkInfo) -> None:
        if self.registry.missing([chunk.hash]):  # its file went with it: do not make a new one
            raise ChunkNotFound(f"chunk {chunk.hash[:12]} was deleted meanwhile")

    # -- layout -----------------------------------------------------------------------------

    @property
    def opening_length(self) -> int:
        """Tokens of the model's opening: the position every composition starts at."""
        return len(self.model.chat.opening)

    def context_of(
        self, parents: list[ChunkInfo], mode: str, recompute: float | None = None
    ) -> AttentionContext:
        """What a new chunk computed after `parents` attends to, in `mode`: the model's
        opening, then the parents. It holds references on its KV, so that a move or a delete
        of those chunks meanwhile cannot free blocks still read: the caller hands it back with
        `release`. Called with the lock held (the segments are found and retained in one go)."""
        parts = [p for c in parents for p in pieces(self.registry, c)]
        ctx = self._attention_context(parts, mode, recompute)
        for segment in ctx.segments:
            self.model.llm.retain(segment)
        return ctx

    def _attention_context(
        self, parts: list[Piece], mode: str, recompute: float | None = None
    ) -> AttentionContext:
        """What a new chunk computed after `parts` attends to, in `mode` (see context_of)."""
        combine = combination(mode, recompute)
        opening = self.tiers.opening_kv()
        start = self.opening_length
        total = sum(p.length for p in parts)
        prefix = self.timeline_prefix(parts)
        if prefix == len(parts):
            segments = [*opening, *self.stored(parts)]
            return AttentionContext(segments, start + total, "", reused=total)
        if mode == "reuse":
            end = max(p.chunk.position + p.end for p in parts)
            return AttentionContext([*opening, *self.stored(parts)], end, combine, reused=total)
        # parts[end:] were computed after exactly this composition of parts[:end] (a
        # conversation continued over it): their stored KV follows the derived KV as it is.
        end = self._continuation_start(parts, prefix, combine)
        head, tail = [*opening, *self.stored(parts[:prefix])], self.stored(parts[end:])
        key, composed, recomputed = self._composition(parts, prefix, end, combine, head)
        return AttentionContext(
            [*head, composed.segment, *tail],
            start + total,
            combine,
            reused=total - recomputed,
            recomputed=recomputed,
            held=[key],
        )

    def release(self, ctx: AttentionContext) -> None:
        """The caller no longer attends to ctx: its KV may go, its derived KV be dropped
        under pressure."""
        with self.lock:
            self.tiers.pins.unpin(ctx.held)
            self.tiers.free(ctx.segments)

    def timeline_prefix(self, parts: list[Piece]) -> int:
        """How many leading pieces sit exactly where, and after what, they were computed."""
        layout: list[tuple[str, int, int]] = []
        offset = self.opening_length
        for i, piece in enumerate(parts):
            expected = self._computed_after(piece)
            if merged(layout) != expected or piece.chunk.position + piece.start != offset:
                return i
            layout.append(piece.key())
            offset += piece.length
        return len(parts)

    def _computed_after(self, piece: Piece) -> list[tuple[str, int, int]] | None:
        """The layout the piece's KV was computed after; None once a chunk of that layout is
        deleted (no active layout can match it then)."""
        try:
            parents = self.registry.get_many(piece.chunk.parent_chunks)
        except ChunkNotFound:
            return None
        before = [p.key() for parent in parents for p in pieces(self.registry, parent)]
        if piece.start:
            before.append((piece.chunk.hash, 0, piece.start))
        return merged(before)

    def _continuation_start(self, parts: list[Piece], prefix: int, combine: str) -> int:
        """Where the trailing pieces that continue the composition before them begin."""
        end, offset = len(parts), self.opening_length + sum(p.length for p in parts)
        while end > prefix + 1:
            piece = parts[end - 1]
            offset -= piece.length
            before = merged([p.key() for p in parts[: end - 1]])
            continues = (
                piece.chunk.metadata.get("combine") == combine
                and piece.chunk.position + piece.start == offset
                and self._computed_after(piece) == before
            )
            if not continues:
                break
            end -= 1
        return end

    # -- derived KV -------------------------------------------------------------------------

    def _composition(
        self, parts: list[Piece], prefix: int, end: int, combine: str, head: list[KVSegment]
    ) -> tuple[str, Composition, int]:
        """The derived KV of parts[prefix:end] composed after parts[:prefix]: kept from an
        earlier call, or made now; pinned for the caller. Returns its key, it, and how many
        tokens were computed now."""
        key = composition_key(merged([p.key() for p in parts[:end]]), combine)
        with self.lock:
            recomputed = 0
            if key in self.tiers.compositions:
                self.stats["composition_hits"] += 1
            else:
                recomputed = self._compose(key, parts[prefix:end], combine, head)
            self.tiers.lru.touch(key)
            self.tiers.pins.pin([key])
            return key, self.tiers.compositions[key], recomputed

    def _compose(self, key: str, parts: list[Piece], combine: str, head: list[KVSegment]) -> int:
        llm = self.model.llm
        start = sum(s.length for s in head)
        tokens = [t for p in parts for t in p.chunk.token_ids[p.start : p.end]]
        # realign copies the parts' KV: brought in first, as that may take room too
        stored = self.stored(parts) if combine != "exact" else []
        self.tiers.make_room(llm.blocks_for(len(tokens)))
        if combine == "exact":
            segment = llm.prefill(tokens, head, start).segment
            chosen = tokens
        else:
            segment = llm.place(stored, start)
            budget = round(recompute_of(combine) * len(tokens))
            chosen = leading_tokens([p.length for p in parts], budget)
            try:
                llm.recompute(segment, tokens, chosen, head)
            except BaseException:
                llm.release(segment)
                raise
        sources = frozenset(p.chunk.hash for p in parts)
        self.tiers.add_composition(key, Composition(segment, sources))
        self.stats["composition_tokens_recomputed"] += len(chosen)
        return len(chosen)


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

    A chunk's first tokens saw nothing but the model's opening before them, and every later
    token of the chunk leans on them: recomputed, they carry the chunks before them to the
    rest. Measured on bench/fidelity.py, choosing instead the tokens whose KV moves most
    (CacheBlend's rule) answered the same cases with a lower KL, but choosing them takes a
    pass over the first layers that costs about what recomputing twice as many tokens does,
    and that brings the KL as low (see the README).
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
