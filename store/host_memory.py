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
        self.kv[chunk_hash] = (_host_copy(k), _host_copy(v))

    def pop(self, chunk_hash: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.kv.pop(chunk_hash, None)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=False)
    return t.clone() if t.device.type == "cpu" else t.cpu()
