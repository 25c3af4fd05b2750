"""The `cpu` tier: chunks' KV held in host memory (pinned when the engine runs on CUDA)."""

from __future__ import annotations

import torch


class HostMemory:
    def __init__(self, budget_bytes: int, pinned: bool = False):
        self.budget_bytes = budget_bytes
        self.pinned = pinned  # pinned host memory makes the way to the GPU a fast DMA copy
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def used_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())

    def __contains__(self, chunk_hash: str) -> bool:
        return chunk_hash in self.kv

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.budget_bytes

    def put(self, chunk_hash: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep k and v; tensors already in host memory of the right kind are taken over, not
        copied (a chunk read from its file is copied once more, into pinned memory)."""
        self.kv[chunk_hash] = (self._to_host(k), self._to_host(v))

    def pop(self, chunk_hash: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.kv.pop(chunk_hash, None)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and (not self.pinned or t.is_pinned()):
            return t
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned).copy_(t)
