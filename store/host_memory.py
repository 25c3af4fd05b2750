"""The `cpu` tier: chunks' KV held in host memory (pinned when the engine runs on CUDA).

KV comes into this tier in buffers that `buffer` hands out. Fresh memory costs a page fault
per 4 KiB on its first touch, which is several times the copy into it, so large buffers of
chunks that left are kept and handed out again, up to the tier's budget in all. Small ones
come from the ordinary allocator, which reuses memory by itself, as torch does with the
pinned buffers used on CUDA.
"""

from __future__ import annotations

import mmap
import sys
import threading

import torch

_KEPT_FROM = 1 << 20  # buffers of this many bytes or more are kept for reuse


class HostMemory:
    def __init__(self, budget_bytes: int, pinned: bool = False):
        self.budget_bytes = budget_bytes
        self.pinned = pinned  # pinned host memory makes the way to the GPU a fast DMA copy
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffers: list[mmap.mmap] = []  # every buffer made, in use or spare
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        # A snapshot: buffers are handed out without the pool's lock, under which kv changes.
        return sum(k.nbytes + v.nbytes for k, v in list(self.kv.values()))

    def __contains__(self, chunk_hash: str) -> bool:
        return chunk_hash in self.kv

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.budget_bytes

    def put(self, chunk_hash: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep k and v; tensors already in host memory of the right kind are taken over, not
        copied (on CUDA, a tensor that is not pinned is copied into pinned memory)."""
        self.kv[chunk_hash] = (self._to_host(k), self._to_host(v))

    def pop(self, chunk_hash: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.kv.pop(chunk_hash, None)

    def buffer(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of host memory (a flat uint8 tensor, contents undefined) to fill with KV:
        a spare buffer no tensor uses any more when one fits, else a new one."""
        if self.pinned or nbytes < _KEPT_FROM:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        with self._lock:
            spare = self._spare_for(nbytes)
            if spare is None:
                # Sizes rounded up by at most an eighth, so that similar chunks share buffers.
                granule = 1 << (nbytes.bit_length() - 4)
                spare = self._new_buffer(-(-nbytes // granule) * granule)
        return torch.frombuffer(spare, dtype=torch.uint8, count=nbytes)

    def _spare_for(self, nbytes: int) -> mmap.mmap | None:
        """The smallest spare buffer that holds `nbytes` without wasting a quarter of itself."""
        sizes = {i: len(self._buffers[i]) for i in self._spare_indices()}
        fitting = [i for i, size in sizes.items() if 0 <= size - nbytes <= size // 4]
        best = min(fitting, key=sizes.__getitem__, default=None)
        return None if best is None else self._buffers[best]

    def _spare_indices(self) -> list[int]:
        # By index: a name bound to a buffer would count as a use of it.
        return [i for i in range(len(self._buffers)) if _unused(self._buffers, i)]

    def _new_buffer(self, size: int) -> mmap.mmap:
        """A new buffer, after dropping spare ones (oldest first) while the tier's chunks, its
        spare buffers and the new one would exceed the budget."""
        spare = self._spare_indices()
        held = self.used_bytes + sum(len(self._buffers[i]) for i in spare)
        for i in spare:
            if held + size <= self.budget_bytes:
                break
            held -= len(self._buffers[i])
            self._buffers[i].close()
        self._buffers = [b for b in self._buffers if not b.closed]
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buffers.append(buffer)
        return buffer

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and (not self.pinned or t.is_pinned()):
            return t
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned).copy_(t)


def _unused(buffers: list[mmap.mmap], i: int) -> bool:
    """No tensor uses the buffer: every tensor made from it holds a reference to it, so the
    list's reference and the argument's are the only ones left."""
    return sys.getrefcount(buffers[i]) == 2
