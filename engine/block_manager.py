"""Physical KV blocks: allocation, reference counts, and claims on partially filled blocks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

from kvchunks.common import CapacityError
from kvchunks.engine.kv_segment import KVSegment

Key = TypeVar("Key", bound=Hashable)


class BlockManager:
    """Owns the free list of the KV pool.

    A block is freed when its reference count drops to zero. Several segments can share a
    block (a chunk ending mid-block and the chunk that continues it, or packed chunks), so
    each block also records how many of its slots are claimed: a writer may only start in
    the rest of a block if nobody has claimed that rest yet.

    Packing: a standalone chunk's KV (nothing is computed after it in its blocks) starts
    in the open tail that the last packed segment left, so small chunks fill blocks one
    after another instead of taking one each. A tail goes to whoever claims it first:
    packing only ever starts in the tail of a packed segment, never in a timeline's (a
    prompt's, an answer's: their continuations, `continue_after`, find those free as
    before), and an answer continuing a standalone prompt still gets the prompt's tail
    unless another chunk was packed after it meanwhile, in which case it starts a new
    block. Chunks never move, so the slots of a packed chunk that has gone stay unused
    until every chunk in the block has gone.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.claimed = [0] * num_blocks
        # A stack: the blocks freed last are handed out first, while they are still in the
        # caches, and blocks freed together come back in their old order (one run of slots).
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self.last_packed: KVSegment | None = None  # whose open tail the next packing starts in

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, start: int, num_tokens: int) -> int:
        return -(-(start + num_tokens) // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise CapacityError(
                f"KV pool full: need {n} blocks, {len(self.free_ids)} free of {self.num_blocks}"
            )
        blocks = [self.free_ids.pop() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
            self.claimed[b] = self.block_size
        return blocks

    def grow(self, blocks: list[int], start: int, num_tokens: int) -> None:
        """Extend `blocks` (holding tokens from slot `start` of the first) to hold num_tokens;
        CapacityError, with nothing taken, when too few blocks are free."""
        blocks += self.allocate(max(self.blocks_needed(start, num_tokens) - len(blocks), 0))

    def retain(self, blocks: list[int] | tuple[int, ...]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"retain of free block {b}"
            self.ref_counts[b] += 1

    def release(self, blocks: list[int] | tuple[int, ...]) -> None:
        for b in reversed(blocks):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.claimed[b] = 0
                self.free_ids.append(b)
                if self.last_packed is not None and self.last_packed.blocks[-1] == b:
                    self.last_packed = None  # the block may come back to a non-packed owner

    def seal(self, segment: KVSegment, packed: bool = False) -> None:
        """Give back the unused tail of a finished segment's last block for continuation,
        or (packed) for the next packed segment."""
        if segment.length and segment.end_slot() % self.block_size:
            self.claimed[segment.blocks[-1]] = segment.end_slot() % self.block_size
        if packed:
            self.last_packed = segment

    def _open_tail(self, segment: KVSegment | None) -> int:
        """Slot offset in the segment's last block where following tokens can go (0: none)."""
        if segment is None or not segment.length:
            return 0
        offset = segment.end_slot() % self.block_size
        return offset if offset and self.claimed[segment.blocks[-1]] == offset else 0

    def blocks_to_follow(self, segment: KVSegment | None, num_tokens: int) -> int:
        """New blocks for num_tokens that directly follow segment (continue_after) or start
        afresh (None)."""
        tail = self._open_tail(segment)
        return self.blocks_needed(tail, num_tokens) - (1 if tail else 0)

    def continue_after(self, segment: KVSegment | None) -> tuple[list[int], int]:
        """Blocks and start offset for tokens that directly follow `segment` in its last block.

        Returns ([], 0) when there is no segment, or its tail is full or already taken: the
        caller starts a new block.
        """
        offset = self._open_tail(segment)
        if not offset:
            return [], 0
        last = segment.blocks[-1]
        self.claimed[last] = self.block_size
        self.retain([last])
        return [last], offset

    def give_back(self, blocks: list[int], start: int) -> None:
        """Release blocks claimed for KV that was never written (slots from `start` on in
        the first): a tail they began in is open again, for the next packed chunk or the
        continuation it was kept for."""
        if start and self.ref_counts[blocks[0]] > 1:
            self.claimed[blocks[0]] = start
        self.release(blocks)

    def fewest_to_release(
        self, candidates: Iterable[tuple[Key, Sequence[KVSegment]]], blocks: int
    ) -> list[Key] | None:
        """The shortest prefix of `candidates` (each a key and the segments it holds, in the
        order they may go) whose release frees `blocks` blocks; None if releasing all of
        them would not. A block that packed segments share is freed only with the last one,
        and one that something else holds is never."""
        chosen: list[Key] = []
        refs: Counter[int] = Counter()
        freed = 0
        for key, segments in candidates:
            if freed >= blocks:
                break
            chosen.append(key)
            for block in (b for segment in segments for b in segment.blocks):
                refs[block] += 1
                freed += refs[block] == self.ref_counts[block]
        return chosen if freed >= blocks else None
