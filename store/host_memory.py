"""The `cpu` tier: chunks' KV held in host memory (pinned when CUDA is present)."""

from __future__ import annotations

import torch


class HostMemory:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def used_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())

    def __contains__(self, chunk_hash: str) -> bool:
        return chunk_hash in self.kv

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.budget_bytes

    def put(self, chunk_hash: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep k and v; tensors already in host memory are taken over, not copied."""
        self.kv[chunk_hash] = (_to_host(k), _to_host(v))

    def pop(self, chunk_hash: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.kv.pop(chunk_hash, None)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    # Pinned host memory makes the way back to the GPU a fast DMA copy.
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
