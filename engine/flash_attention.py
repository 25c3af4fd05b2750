"""flash-attn backend (CUDA, float16/bfloat16), asked for by name when the package is installed.

Keys are gathered from the pool exactly as in the torch backend (so segments may start and
end inside blocks), then one `flash_attn_varlen_func` call serves the whole batch. Its
causal mask is aligned to the bottom right when queries are fewer than keys, which is the
visibility rule here: every context key, and the sequence's own keys up to each query.
"""

from __future__ import annotations

import torch

from kvchunks.engine.attention import AttentionMetadata, TorchAttention


def flash_attn_available(device: str, dtype: torch.dtype) -> bool:
    if not device.startswith("cuda") or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class FlashAttention(TorchAttention):
    padded_decode = False  # varlen kernels need no padding

    def __init__(self, kv_cache: torch.Tensor):
        super().__init__(kv_cache)
        from flash_attn import flash_attn_varlen_func

        self.varlen = flash_attn_varlen_func

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = self.store(layer, k, v, meta)
        keys, values, q_lens, k_lens = [], [], [], []
        for s in meta.sequences:
            ks, vs = self.keys(s, k, v, k_cache, v_cache)
            keys.append(ks)
            values.append(vs)
            q_lens.append(s.query_end - s.query_start)
            k_lens.append(len(ks))
        return self.varlen(
            q,
            torch.cat(keys),
            torch.cat(values),
            _cumulative(q_lens, q.device),
            _cumulative(k_lens, q.device),
            max(q_lens),
            max(k_lens),
            causal=True,
        )


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    out[1:] = torch.tensor(lengths, device=device).cumsum(0)
    return out
