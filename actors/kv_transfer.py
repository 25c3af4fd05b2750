"""KVPayload: a chunk's K and V as they travel through Ray's object store.

numpy arrays, because Ray stores them out of band and a reader on the same node maps them
without a copy. numpy has no bfloat16, so bfloat16 travels as its raw 16-bit patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_RAW = {torch.bfloat16: torch.int16}


@dataclass
class KVPayload:
    k: np.ndarray  # [layers, tokens, kv_heads, head_dim]
    v: np.ndarray
    dtype: str  # the engine's dtype (float32, bfloat16, float16)

    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor) -> KVPayload:
        dtype = str(k.dtype).removeprefix("torch.")
        return cls(_to_numpy(k), _to_numpy(v), dtype)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_torch(self.k, self.dtype), _to_torch(self.v, self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.k.shape)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(_RAW.get(t.dtype, t.dtype)).numpy()


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    # The object store hands out read-only buffers; the copy makes a tensor we may write.
    t = torch.from_numpy(np.array(a, copy=True))
    return t.view(getattr(torch, dtype))
