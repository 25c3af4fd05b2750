"""Paged attention over the KV pool, filtered to each sequence's visible segments.

Each sequence in a batch attends to (a) a list of stored KV segments, which may start and
end mid-block and belong to any chunks, fully visible, and (b) its own tokens, causally.
The model writes each new token's K/V into the pool first (slot mapping), then attends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from kvchunks.engine.rotary import rotate


@dataclass
class SequenceAttention:
    """Where one sequence's queries are in the flat batch and which pool slots they see."""

    query_start: int
    query_end: int
    key_slots: torch.Tensor  # [T] flat pool slots: context segments first, then own tokens
    # Queries are the last of the sequence's own tokens, so they see every context key and
    # their own keys causally: a causal mask aligned to the lower right. `fresh` means there
    # is nothing before them, and the new K/V can be used directly, without a gather.
    fresh: bool
    key_cos: torch.Tensor | None = None  # [T, 1, head_dim] RoPE delta of shifted segments
    key_sin: torch.Tensor | None = None
    # Host memory copies, for a backend that plans on the host (see flex_plan): key_slots
    # (None: read back from the device, a wait on a GPU), and the delta in positions behind
    # key_cos (None: nothing shifted).
    host_key_slots: torch.Tensor | None = None
    key_shifts: torch.Tensor | None = None
    # Selective recompute: queries are some of the keys, not the last ones; each sees the
    # keys up to its own index here. None: the lower-right causal rule above.
    visible: torch.Tensor | None = None  # [queries] index of each query's own key
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def slots_on_host(self) -> torch.Tensor:
        return self.key_slots.cpu() if self.host_key_slots is None else self.host_key_slots

    def mask(self) -> torch.Tensor | None:
        """The visibility mask [queries, keys] (None when fresh: plain causal), built on first
        use and shared by every layer."""
        if self.fresh:
            return None
        if self._mask is None:
            n, t = self.query_end - self.query_start, self.key_slots.numel()
            keys = torch.arange(t, device=self.key_slots.device)
            if self.visible is None:
                self._mask = keys[None, :] <= keys[t - n :, None]
            else:
                self._mask = keys[None, :] <= self.visible[:, None]
        return self._mask


@dataclass
class DecodeBatch:
    """Sequences that each decode one token, keys padded to one length for one kernel."""

    rows: slice  # which rows of the batch these are
    key_slots: torch.Tensor  # [B, T] (padding points at slot 0 and is masked out)
    mask: torch.Tensor  # [B, 1, 1, T] bool
    key_cos: torch.Tensor | None = None  # [B, T, 1, head_dim]
    key_sin: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] where each new token's K/V is written
    cos: torch.Tensor  # [N, 1, head_dim] RoPE tables of the new tokens' positions
    sin: torch.Tensor
    sequences: list[SequenceAttention]
    decode: list[DecodeBatch] | None = None  # set when every sequence decodes one token


class AttentionBackend(Protocol):
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Store k, v [N, kv_heads, D] at meta.slot_mapping; return attention [N, heads, D]."""
        ...


class TorchAttention:
    """Reference backend on torch's scaled_dot_product_attention (CPU and CUDA)."""

    padded_decode = True  # decode batches arrive as padded DecodeBatch groups

    def __init__(self, kv_cache: torch.Tensor):
        # [2, layers, blocks, block_size, kv_heads, head_dim] viewed as flat slots per layer.
        self.k_slots = kv_cache[0].flatten(1, 2)
        self.v_slots = kv_cache[1].flatten(1, 2)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = self.store(layer, k, v, meta)
        out = torch.empty_like(q)
        if meta.decode is not None:
            for group in meta.decode:
                out[group.rows] = self._decode(q[group.rows], k_cache, v_cache, group)
            return out
        for s in meta.sequences:
            qs = q[s.query_start : s.query_end]
            ks, vs = self.keys(s, k, v, k_cache, v_cache)
            out[s.query_start : s.query_end] = _sdpa(qs[None], ks[None], vs[None], s.mask())[0]
        return out

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V into the pool; return the layer's flat slot views."""
        k_cache, v_cache = self.k_slots[layer], self.v_slots[layer]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        return k_cache, v_cache

    @staticmethod
    def keys(
        s: SequenceAttention,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V one sequence attends to: its fresh tokens, or its visible slots gathered
        (and re-rotated where a segment is shifted)."""
        if s.fresh:
            return k[s.query_start : s.query_end], v[s.query_start : s.query_end]
        ks, vs = k_cache.index_select(0, s.key_slots), v_cache.index_select(0, s.key_slots)
        if s.key_cos is not None:
            ks = rotate(ks, s.key_cos, s.key_sin)
        return ks, vs

    @staticmethod
    def _decode(rows, k_cache, v_cache, batch: DecodeBatch) -> torch.Tensor:
        # index_select on the flat slot list is far faster than 2-D advanced indexing on CPU.
        flat = batch.key_slots.flatten()
        shape = (*batch.key_slots.shape, *k_cache.shape[1:])  # [B, T, kv_heads, D]
        ks = k_cache.index_select(0, flat).view(shape)
        vs = v_cache.index_select(0, flat).view(shape)
        if batch.key_cos is not None:
            ks = rotate(ks.flatten(0, 1), batch.key_cos.flatten(0, 1), batch.key_sin.flatten(0, 1))
            ks = ks.view_as(vs)
        # One query per head: the heads that share a KV head become the query rows of one
        # attention over it, the same sums as GQA without expanding K and V per head.
        grouped = rows.view(len(rows), ks.shape[2], -1, rows.shape[-1])
        out = F.scaled_dot_product_attention(
            grouped, ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=batch.mask
        )
        return out.reshape(rows.shape)  # CUDA's kernels may lay heads out differently


def _sdpa(q, k, v, mask) -> torch.Tensor:
    """q [B, n, H, D], k/v [B, T, KVH, D] -> [B, n, H, D]; mask None means causal."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    )
    return out.transpose(1, 2)
