"""CUDA graphs for decode steps and short prefills on the FlexAttention backend (CUDA only).

A decode step runs a few small kernels per layer for a handful of rows, so on a GPU its
time goes to launching them; replaying a captured graph launches them all at once. The
same holds for a short prompt over stored context (a question over loaded documents, a
chat turn): its few queries cost little, the launches much. As in nano-vLLM, there is one
graph per shape in a fixed set, a step is padded up to the next shape, and what changes
from step to step is data, not shape: token ids, slots, RoPE tables and the FlexAttention
plan, whose block lists are padded to a fixed width. A graph is captured when a step of
its shape first comes, and serves every activation pattern that fits it. Padding rows are
one-token sequences, or rows no sequence owns, in a scratch slot of the pool that nothing
else uses.

The shapes: a batch of sequences that each decode one token (graphs by batch size), or
one sequence with up to QUERY_TILE new tokens (graphs by their count, rounded up). Such a
step is replayed when no sequence attends to a RoPE-shifted segment (one key group) or to
one slot twice, and every sequence's keys lie in at most `max_entries` blocks, as those
of one contiguous timeline do; any other step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvchunks.engine.attention import AttentionMetadata, SequenceAttention
from kvchunks.engine.flex_attention import FlexAttention
from kvchunks.engine.flex_plan import QUERY_TILE, FlexPlan, HostPlan, plan_on_host
from kvchunks.engine.model import CausalLM

PREFILL_SIZES = [16, 32, 64, QUERY_TILE]  # new tokens of one sequence's short prefill


@dataclass
class Captured:
    """One graph and the fixed tensors it reads and writes."""

    graph: Any  # torch.cuda.CUDAGraph
    ids: torch.Tensor
    meta: AttentionMetadata
    plan: FlexPlan
    hidden: torch.Tensor


class StepGraphs:
    """The captured graphs of one engine, by shape (see the module's docstring)."""

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
        self.scratch_on_host = torch.tensor([scratch_slot])
        self.scratch = self.scratch_on_host.to(backend.k_slots.device)
        self.captured: dict[tuple[int, int], Captured] = {}
        self.memory = None  # one memory pool for every graph: they never run at once

    def run(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Hidden states [tokens, hidden] of a step from a graph; None if none fits it."""
        n, tokens = len(meta.sequences), len(ids)
        shape = self._shape(n, tokens)
        if shape is None or any(s.key_cos is not None for s in meta.sequences):
            return None
        size, queries = shape
        plan = self._plan(meta.sequences + self._padding(tokens, size - n), queries)
        if not plan.exact or plan.entries != self.max_entries:
            return None  # a slot seen twice, or keys in more blocks than a graph holds
        captured = self.captured.get(shape) or self._capture(shape)
        captured.ids[:tokens] = ids
        rows = len(captured.ids)
        captured.meta.slot_mapping.copy_(
            F.pad(meta.slot_mapping, (0, rows - tokens), value=self.scratch_slot)
        )
        captured.meta.cos[:tokens] = meta.cos
        captured.meta.sin[:tokens] = meta.sin
        captured.plan.flat.copy_(plan.flat)  # the block lists' and ranks' one copy
        captured.graph.replay()
        return captured.hidden[:tokens]

    def _shape(self, n: int, tokens: int) -> tuple[int, int] | None:
        """(sequences, queries per sequence) of the graph for a step of n sequences and
        `tokens` new tokens, padded up; None when no graph takes it."""
        if tokens == n and n <= self.sizes[-1]:
            return next(s for s in self.sizes if s >= n), 1
        if n == 1 and tokens <= PREFILL_SIZES[-1]:
            return 1, next(q for q in PREFILL_SIZES if q >= tokens)
        return None

    def _capture(self, shape: tuple[int, int]) -> Captured:
        size, queries = shape
        rows = size * queries
        cache = self.backend.k_slots
        cos = cache.new_ones(rows, 1, cache.shape[-1])
        slots = torch.full((rows,), self.scratch_slot, device=cache.device)
        # Stand-ins of the step's shape; their plan is overwritten before every replay.
        if queries == 1:
            stand_ins = self._padding(0, size)
        else:
            stand_ins = [SequenceAttention(0, queries, slots, False, host_key_slots=slots.cpu())]
        meta = AttentionMetadata(slots, cos, cos.new_zeros(cos.shape), stand_ins)
        ids = torch.zeros(rows, dtype=torch.long, device=cache.device)
        host = self._plan(stand_ins, queries)
        host.exact = True  # the stand-in sees its slot many times; what replays never does
        plan = host.to(cache.device)

        def forward() -> torch.Tensor:
            self.backend.use(meta, plan)
            return self.model(ids, meta, self.backend)

        graph, hidden = self._record(forward)
        self.captured[shape] = Captured(graph, ids, meta, plan, hidden)
        return self.captured[shape]

    def _record(self, forward: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Capture `forward` in a graph; return it and the tensor the forward writes."""
        graph = torch.cuda.CUDAGraph()
        with self.model.unwatched():  # a stop check between layers waits for the capture
            forward()  # warm-up: compiles FlexAttention for the shape
            # thread_local: tier moves copy out of the pool on other threads meanwhile (and
            # may allocate); only this thread's calls must be capture-safe.
            with torch.cuda.graph(graph, self.memory, capture_error_mode="thread_local"):
                hidden = forward()
        self.memory = graph.pool()
        return graph, hidden

    def _plan(self, sequences: list[SequenceAttention], queries: int) -> HostPlan:
        backend = self.backend
        return plan_on_host(
            sequences, backend.block_size, backend.num_blocks, self.max_entries, queries
        )

    def _padding(self, first_row: int, count: int) -> list[SequenceAttention]:
        """`count` one-token sequences in the scratch slot, from row first_row on."""
        rows = range(first_row, first_row + count)
        return [
            SequenceAttention(i, i + 1, self.scratch, False, host_key_slots=self.scratch_on_host)
            for i in rows
        ]
