"""FlexAttention backend: attention that reads the paged pool in place, through block lists.

The pool's flat slots are the key axis of each FlexAttention call. The step's plan (see
flex_plan) lists, per sequence and query tile, the pool blocks its visible keys lie in, and
masks the slots of them it does not see, so the kernel reads those blocks and no others:
nothing is gathered.

Segments re-placed by a RoPE delta (`shift`) cannot be rotated by `score_mod`, which sees
only the finished score. Rotating the query instead is the same product,
R(-d)q . k = q . R(d)k, so the keys are split into groups that share one rotation, each
group is attended in its own call with its rotated queries, and the calls are merged by
their log-sum-exp. Without shifted segments there is one group and one call.

Compiled with `torch.compile` on CUDA. On CPU it runs eagerly, where FlexAttention
evaluates the mask over the whole pool: a check of the block lists and masks against the
torch backend, not a fast path (the torch backend stays the CPU default).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from kvchunks.engine.attention import AttentionMetadata, TorchAttention
from kvchunks.engine.flex_plan import FlexPlan, KeyGroup, build_plan
from kvchunks.engine.rotary import rotate

# The compiled kernels read keys in tiles of this many; a pool block must hold whole tiles.
KERNEL_BLOCK = 128


def flex_usable(device: str, block_size: int) -> bool:
    """Whether the backend can run: eagerly on CPU, compiled on CUDA when a pool block is a
    whole number of the kernels' key tiles."""
    return not device.startswith("cuda") or block_size % KERNEL_BLOCK == 0


class FlexAttention(TorchAttention):
    padded_decode = False  # the block lists serve any mix of key counts

    def __init__(self, kv_cache: torch.Tensor, compiled: bool):
        super().__init__(kv_cache)
        self.block_size = kv_cache.shape[3]
        self.attend = _compiled_flex_attention() if compiled else flex_attention
        self._planned: tuple[AttentionMetadata, FlexPlan] | None = None

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        plan = self.plan(meta)
        if not plan.exact:
            return super().forward(layer, q, k, v, meta)
        k_cache, v_cache = self.store(layer, k, v, meta)
        keys, values = _as_heads(k_cache), _as_heads(v_cache)
        # Padded queries read and write one row past the batch: no data-dependent shapes, so
        # a CUDA graph can capture this.
        q = F.pad(q, (0, 0, 0, 0, 0, 1))
        if len(plan.groups) == 1:
            out = self._attend(q, keys, values, plan, plan.groups[0], lse=False)
        else:
            parts = [self._attend(q, keys, values, plan, g, lse=True) for g in plan.groups]
            out = _merge(*zip(*parts, strict=True))
        # Zeros, not uninitialized memory: rows no query writes (a graph's padding past a
        # short prompt) go on through the layers, and their KV into the scratch slot.
        result = torch.zeros_like(q)
        result[plan.query_rows.flatten()] = out.transpose(1, 2).flatten(0, 1)
        return result[:-1]

    def _attend(self, q, keys, values, plan: FlexPlan, group: KeyGroup, lse: bool):
        """One group's attention [B, heads, Lq, head_dim] (and its log-sum-exp with lse)."""
        rows = q if group.cos is None else rotate(q, group.cos, -group.sin)
        queries = rows[plan.query_rows].transpose(1, 2)
        aux = AuxRequest(lse=True) if lse else None
        out = self.attend(
            queries, keys, values, block_mask=group.mask, enable_gqa=True, return_aux=aux
        )
        return (out[0], out[1].lse) if lse else out

    def use(self, meta: AttentionMetadata, plan: FlexPlan) -> None:
        """Attend with `plan` for `meta` (a CUDA graph's fixed plan, refilled per replay)."""
        self._planned = (meta, plan)

    def plan(self, meta: AttentionMetadata) -> FlexPlan:
        """The plan of this step's batch, built on the first layer (the cache holds meta
        itself, so its identity cannot be reused while cached)."""
        if self._planned is None or self._planned[0] is not meta:
            self._planned = (meta, build_plan(meta.sequences, self.block_size, self.num_blocks))
        return self._planned[1]

    @property
    def num_blocks(self) -> int:
        return self.k_slots.shape[1] // self.block_size


@functools.cache
def _compiled_flex_attention():
    """One compiled FlexAttention for every engine in the process, so they share kernels."""
    # Each dtype, pool size and graph shape of those engines may add a compile; past
    # Dynamo's default limit of 8 a call would run FlexAttention eagerly, over the whole
    # pool (and break a graph's capture).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention)


def _as_heads(cache: torch.Tensor) -> torch.Tensor:
    """A layer's flat slots [slots, kv_heads, D] as FlexAttention's [1, kv_heads, slots, D]
    (a view: the kernel reads the pool where it is)."""
    return cache.unsqueeze(0).transpose(1, 2)


def _merge(outs: tuple[torch.Tensor, ...], lses: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Attention over the union of disjoint key groups from each group's output and
    log-sum-exp. A query that sees nothing of a group has lse -inf there and weight 0."""
    lse = torch.stack(lses)  # [G, B, heads, Lq]
    weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).nan_to_num(0.0)
    total = sum(w[..., None] * o.float() for w, o in zip(weights, outs, strict=True))
    return total.to(outs[0].dtype)
