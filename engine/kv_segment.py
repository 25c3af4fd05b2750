"""KVSegment: a run of stored KV tokens in the paged pool, as the engine hands it out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVSegment:
    """A run of `length` tokens of stored KV, laid out contiguously in paged blocks.

    Token i lives at slot `start + i` of the virtual concatenation of `blocks`, so a
    segment may begin and end in the middle of a block. `position` is the RoPE position
    its first token was computed at. `shift` is a RoPE delta to apply to its keys when it
    is attended (used to re-place standalone chunks at new positions; 0 = as stored).
    """

    blocks: tuple[int, ...]
    start: int
    length: int
    position: int
    shift: int = 0

    def slot_runs(self, block_size: int) -> list[tuple[int, int]]:
        """The segment's pool slots as (first flat slot, count) runs; blocks that follow one
        another in the pool make one run, so a copy of the segment is a few large copies."""
        runs: list[tuple[int, int]] = []
        at, end = self.start, self.end_slot()
        while at < end:
            count = min(block_size - at % block_size, end - at)
            first = self.blocks[at // block_size] * block_size + at % block_size
            if runs and sum(runs[-1]) == first:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((first, count))
            at += count
        return runs

    def end_slot(self) -> int:
        """Offset, within the concatenation of `blocks`, just past the last token."""
        return self.start + self.length

    def sub(self, offset: int, length: int, block_size: int) -> KVSegment:
        """The part of this segment from token `offset`, `length` tokens long (no copy)."""
        first = (self.start + offset) // block_size
        last = (self.start + offset + max(length, 1) - 1) // block_size
        return KVSegment(
            blocks=self.blocks[first : last + 1],
            start=(self.start + offset) % block_size,
            length=length,
            position=self.position + offset,
            shift=self.shift,
        )


def slice_segments(
    segments: list[KVSegment], start: int, length: int, block_size: int
) -> list[KVSegment]:
    """Tokens [start, start + length) of the concatenation of `segments`, as segments."""
    out, offset = [], 0
    for seg in segments:
        lo, hi = max(start, offset), min(start + length, offset + seg.length)
        if lo < hi:
            out.append(seg.sub(lo - offset, hi - lo, block_size))
        offset += seg.length
    return out
