"""One request's state: its own tokens, their KV blocks, and the stored KV it attends to."""

from __future__ import annotations

from enum import Enum, auto

import torch

from kvchunks.engine.kv_segment import KVSegment
from kvchunks.engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(
        self,
        token_ids: list[int],
        params: SamplingParams,
        context: list[KVSegment] | tuple[KVSegment, ...] = (),
        position: int | None = None,
        keep_kv: bool = False,
        context_token_ids: list[int] | tuple[int, ...] = (),
    ):
        self.status = Status.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.context = list(context)
        # The tokens of `context`, for repetition_penalty (it counts every token seen).
        self.context_token_ids = list(context_token_ids)
        self.position = sum(s.length for s in context) if position is None else position
        self.keep_kv = keep_kv
        # Blocks for the whole answer were taken when it was queued (LLM.add_request's
        # reserve): it never needs to grow, and is never preempted to let another grow.
        self.reserved = False
        self.num_computed = 0
        # Tokens the current step computes, from num_computed on: a prompt longer than a
        # step's budget is computed over several steps (see Scheduler.schedule).
        self.num_scheduled = 0
        self.blocks: list[int] = []
        self.start = 0  # slot offset of the first own token in blocks[0]
        self.closing = False  # finished, but the last token's KV is still to be computed
        self.finish_reason: str | None = None
        # The answer's text that a stop string cut inside a token: the text keeps it, the
        # tokens (and their KV) end before that token.
        self.stop_tail = ""
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self._context_runs: list[tuple[int, int]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def num_computed_after_step(self) -> int:
        return self.num_computed + self.num_scheduled

    @property
    def catches_up(self) -> bool:
        """Whether the current step computes all its tokens, so that a token is sampled."""
        return self.num_computed_after_step == self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def own_segment(self) -> KVSegment:
        """The KV this sequence computed itself, as a segment of its blocks."""
        return KVSegment(tuple(self.blocks), self.start, self.num_computed, self.position)

    def context_slot_runs(self, block_size: int) -> list[tuple[int, int]]:
        """The pool slots of the stored KV it attends to, as runs (see KVSegment.slot_runs),
        found once: the context stays as it is, and its blocks held, for the sequence's life."""
        if self._context_runs is None:
            runs = [run for segment in self.context for run in segment.slot_runs(block_size)]
            self._context_runs = runs
        return self._context_runs
