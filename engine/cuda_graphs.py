"""CUDA graphs for decode steps on the FlexAttention backend (CUDA only).

A decode step runs a few small kernels per layer for a handful of rows, so on a GPU its
time goes to launching them; replaying a captured graph launches them all at once. As in
nano-vLLM, there is one graph per batch size in a fixed set, a batch is padded up to the
next size, and what changes from step to step is data, not shape: token ids, slots, RoPE
tables and the FlexAttention plan, whose block lists are padded to a fixed width. A graph
is captured when a step of its size first comes, and serves every activation pattern that
fits it. Padding rows are one-token sequences in a scratch slot of the pool that nothing
else uses.

A step is replayed when every sequence decodes one token, none attends to a RoPE-shifted
segment (one key group) or to one slot twice, and every sequence's keys lie in at most
`max_entries` blocks, as those of one contiguous timeline do; any other step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvchunks.engine.attention import AttentionMetadata, SequenceAttention
from kvchunks.engine.flex_attention import FlexAttention, FlexPlan, build_plan
from kvchunks.engine.model import CausalLM


@dataclass
class Captured:
    """One graph and the fixed tensors it reads and writes."""

    graph: Any  # torch.cuda.CUDAGraph
    ids: torch.Tensor
    meta: AttentionMetadata
    plan: FlexPlan
    hidden: torch.Tensor


class DecodeGraphs:
    """The captured graphs of one engine, by batch size (see the module's docstring)."""

    def __init__(
        self,
        model: CausalLM,
        backend: FlexAttention,
        max_batch: int,
        max_entries: int,
        scratch_slot: int,
    ):
        self.model, self.backend = model, backend
        self.sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
        self.sizes.append(max_batch)
        self.max_entries, self.scratch_slot = max_entries, scratch_slot
        self.captured: dict[int, Captured] = {}
        self.memory = None  # one memory pool for every graph: they never run at once

    def run(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Hidden states [N, hidden] of a decode step from a graph; None if none fits it."""
        n = len(meta.sequences)
        shifted = any(s.key_cos is not None for s in meta.sequences)
        if len(ids) != n or n > self.sizes[-1] or shifted:
            return None
        size = next(s for s in self.sizes if s >= n)
        plan = self._plan(meta.sequences + self._padding(n, size))
        if not plan.exact or plan.table.blocks.shape[1] != self.max_entries:
            return None  # a slot seen twice, or keys in more blocks than a graph holds
        captured = self.captured.get(size) or self._capture(size)
        captured.ids[:n] = ids
        captured.meta.slot_mapping.copy_(
            F.pad(meta.slot_mapping, (0, size - n), value=self.scratch_slot)
        )
        captured.meta.cos[:n] = meta.cos
        captured.meta.sin[:n] = meta.sin
        for fixed, fresh in zip(_tensors(captured.plan), _tensors(plan), strict=True):
            fixed.copy_(fresh)
        captured.graph.replay()
        return captured.hidden[:n]

    def _capture(self, size: int) -> Captured:
        padding = self._padding(0, size)
        cache = self.backend.k_slots
        cos = cache.new_ones(size, 1, cache.shape[-1])
        slots = torch.full((size,), self.scratch_slot, device=cache.device)
        meta = AttentionMetadata(slots, cos, cos.new_zeros(cos.shape), padding)
        ids = torch.zeros(size, dtype=torch.long, device=cache.device)
        plan = self._plan(padding)

        def forward() -> torch.Tensor:
            self.backend.use(meta, plan)
            return self.model(ids, meta, self.backend)

        graph, hidden = self._record(forward)
        self.captured[size] = Captured(graph, ids, meta, plan, hidden)
        return self.captured[size]

    def _record(self, forward: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Capture `forward` in a graph; return it and the tensor the forward writes."""
        forward()  # warm-up: compiles FlexAttention for the shape
        graph = torch.cuda.CUDAGraph()
        # thread_local: tier moves copy out of the pool on other threads meanwhile (and may
        # allocate); only this thread's calls must be capture-safe.
        with torch.cuda.graph(graph, self.memory, capture_error_mode="thread_local"):
            hidden = forward()
        self.memory = graph.pool()
        return graph, hidden

    def _plan(self, sequences: list[SequenceAttention]) -> FlexPlan:
        backend = self.backend
        return build_plan(sequences, backend.block_size, backend.num_blocks, self.max_entries)

    def _padding(self, first_row: int, size: int) -> list[SequenceAttention]:
        """One-token sequences in the scratch slot for rows first_row..size-1."""
        slot = torch.tensor([self.scratch_slot], device=self.backend.k_slots.device)
        return [SequenceAttention(i, i + 1, slot, fresh=False) for i in range(first_row, size)]


def _tensors(plan: FlexPlan) -> list[torch.Tensor]:
    """What a graph's FlexAttention reads of a plan (one key group)."""
    (group,) = plan.groups
    mask = group.mask
    return [
        plan.query_rows,
        plan.query_rank,
        plan.table.ranks,
        plan.table.entry_of_block,
        mask.kv_num_blocks,
        mask.kv_indices,
        mask.full_kv_num_blocks,
        mask.full_kv_indices,
    ]
