"""Physical KV blocks: allocation, reference counts, and claims on partially filled blocks."""

from __future__ import annotations

from kvchunks.common import CapacityError
from kvchunks.engine.kv_segment import KVSegment


class BlockManager:
    """Owns the free list of the KV pool.

    A block is freed when its reference count drops to zero. Several segments can share a
    block (a chunk ending mid-block and the chunk that continues it), so each block also
    records how many of its slots are claimed: a writer may only continue a segment into
    the rest of its last block if nobody has claimed that rest yet.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.claimed = [0] * num_blocks
        # A stack: the blocks freed last are handed out first, while they are still in the
        # caches, and blocks freed together come back in their old order (one run of slots).
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))

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

    def seal(self, segment: KVSegment) -> None:
        """Give back the unused tail of a finished segment's last block for continuation."""
        if segment.length and segment.end_slot() % self.block_size:
            self.claimed[segment.blocks[-1]] = segment.end_slot() % self.block_size

    def _open_tail(self, segment: KVSegment) -> int:
        """Slot offset in the segment's last block where following tokens can go (0: none)."""
        if not segment.length:
            return 0
        offset = segment.end_slot() % self.block_size
        return offset if offset and self.claimed[segment.blocks[-1]] == offset else 0

    def blocks_to_follow(self, segment: KVSegment | None, num_tokens: int) -> int:
        """New blocks for num_tokens that directly follow segment (continue_after) or start
        afresh (None)."""
        tail = self._open_tail(segment) if segment is not None else 0
        return self.blocks_needed(tail, num_tokens) - (1 if tail else 0)

    def continue_after(self, segment: KVSegment) -> tuple[list[int], int]:
        """Blocks and start offset for tokens that directly follow `segment` in its last block.

        Returns ([], 0) when that tail is full or already taken: the caller starts a new block.
        """
        offset = self._open_tail(segment)
        if not offset:
            return [], 0
        last = segment.blocks[-1]
        self.claimed[last] = self.block_size
        self.retain([last])
        return [last], offset
