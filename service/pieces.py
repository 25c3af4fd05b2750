"""Which stored KV a chunk reads: a chunk that owns KV reads its own, a view reads ranges of
its sources'. Everything that lays chunks out works on these ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvchunks.store.chunk import ChunkInfo, SourceSpan


class Records(Protocol):
    def get_many(self, hashes, context: str | None = None) -> list[ChunkInfo]: ...


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


def pieces(records: Records, chunk: ChunkInfo) -> list[Piece]:
    if chunk.layout != "view":
        return [Piece(chunk, 0, chunk.token_count)]
    owners = {c.hash: c for c in records.get_many({s.hash for s in chunk.sources})}
    return [Piece(owners[s.hash], s.offset, s.offset + s.length) for s in chunk.sources]


def owners(records: Records, chunk: ChunkInfo) -> list[ChunkInfo]:
    """The chunks that own the KV a chunk reads: itself, or a view's sources."""
    return list({p.chunk.hash: p.chunk for p in pieces(records, chunk)}.values())


def owner_hashes(chunk: ChunkInfo) -> list[str]:
    """`owners`' hashes, from the record alone."""
    return list(dict.fromkeys(s.hash for s in spans(chunk)))


def spans(chunk: ChunkInfo) -> list[SourceSpan]:
    """The ranges of KV-owning chunks that a chunk's tokens are, in order."""
    if chunk.layout == "view":
        return chunk.sources
    return [SourceSpan(chunk.hash, 0, chunk.token_count)]


def spans_of(chunks: list[ChunkInfo]) -> list[SourceSpan]:
    return [s for c in chunks for s in spans(c)]


def cut(spans: list[SourceSpan], start: int, end: int) -> list[SourceSpan]:
    """Tokens [start, end) of the concatenation of `spans`, as spans."""
    out, offset = [], 0
    for s in spans:
        lo, hi = max(start, offset), min(end, offset + s.length)
        if lo < hi:
            out.append(SourceSpan(s.hash, s.offset + lo - offset, hi - lo))
        offset += s.length
    return out


def merged(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Adjacent ranges of the same chunk joined, so one layout has one spelling."""
    out: list[tuple[str, int, int]] = []
    for h, start, end in ranges:
        if out and out[-1][0] == h and out[-1][2] == start:
            out[-1] = (h, out[-1][1], end)
        else:
            out.append((h, start, end))
    return out
