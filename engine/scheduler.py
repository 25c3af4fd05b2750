"""Continuous batching with chunked prefill: each step decodes every running answer and
spends what is left of its token budget on prompts, long ones in pieces."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kvchunks.common import CapacityError
from kvchunks.engine.block_manager import BlockManager
from kvchunks.engine.config import EngineConfig
from kvchunks.engine.sequence import Sequence, Status
from kvchunks.engine.stop_strings import stop_window


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        eos_token_ids: list[int],
        detokenize: Callable[[list[int]], str],  # for stop strings
    ):
        self.detokenize = detokenize
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.blocks = block_manager
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a request. It holds references on the KV it attends to until it finishes, so
        that moving or deleting those chunks meanwhile cannot free blocks it still reads."""
        need = self.blocks.blocks_needed(seq.start, seq.num_tokens + seq.params.max_tokens)
        if need > self.blocks.num_blocks:
            raise CapacityError(
                f"request needs up to {need} KV blocks (its prompt and max_tokens) but the "
                f"pool has {self.blocks.num_blocks}"
            )
        for segment in seq.context:
            self.blocks.retain(segment.blocks)
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> list[Sequence]:
        """One step's batch, at most max_num_batched_tokens new tokens: the next token of
        every running answer first, so that a long prompt never stalls them, then the rest
        of prompts begun in earlier steps, then waiting requests. A prompt longer than what
        is left of the budget is computed in pieces over several steps."""
        running = self._keep_running()
        batch = [seq for seq in running if seq.num_uncomputed == 1]  # answering
        for seq in batch:
            seq.num_scheduled = 1
        budget = self.max_num_batched_tokens - len(batch)
        for seq in running:
            if seq.num_uncomputed > 1 and budget:
                budget -= self._schedule_part(seq, budget)
                batch.append(seq)
        return batch + self._admit(budget)

    def _schedule_part(self, seq: Sequence, budget: int) -> int:
        seq.num_scheduled = min(seq.num_uncomputed, budget)
        return seq.num_scheduled

    def _admit(self, budget: int) -> list[Sequence]:
        """Waiting requests in the order they came, until one does not fit the pool; those
        behind it whose blocks were reserved when queued need nothing from it and go too."""
        batch: list[Sequence] = []
        blocked = False
        for seq in list(self.waiting):
            if not budget or len(self.running) >= self.max_num_seqs:
                break
            if not ((seq.reserved or not blocked) and self._grow(seq, seq.num_tokens)):
                blocked = True
                continue
            budget -= self._schedule_part(seq, budget)
            seq.status = Status.RUNNING
            self.waiting.remove(seq)
            self.running.append(seq)
            batch.append(seq)
        return batch

    def _keep_running(self) -> list[Sequence]:
        """The running sequences, each with blocks for all its tokens: when the pool is full,
        the newest ones whose blocks were not reserved are preempted to make room."""
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self._grow(seq, seq.num_tokens):
                victim = self._newest_unreserved()
                if victim is None:
                    self._preempt(seq)
                    break
                self._preempt(victim)
            else:
                kept.append(seq)
        self.running.extend(kept)
        return kept

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure seq has blocks for num_tokens own tokens; False if the pool is full."""
        try:
            self.blocks.grow(seq.blocks, seq.start, num_tokens)
        except CapacityError:
            return False
        return True

    def _newest_unreserved(self) -> Sequence | None:
        """Take out the newest running sequence whose blocks were not reserved, if any."""
        for seq in reversed(self.running):
            if not seq.reserved:
                self.running.remove(seq)
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's KV (reopening a tail it continued in) and queue it to be
        recomputed when there is room again."""
        self.num_preemptions += 1
        self.blocks.give_back(seq.blocks, seq.start)
        seq.blocks, seq.start, seq.num_computed = [], 0, 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Count what the step computed and append the sampled tokens, one for each sequence
        that caught up, in order; return the sequences that finished in this step."""
        finished = []
        sampled = iter(token_ids)
        for seq in seqs:
            caught_up = seq.catches_up
            seq.num_computed += seq.num_scheduled
            if not caught_up:  # a prompt in pieces: no token until its last piece
                continue
            token = next(sampled)
            if seq.closing:
                self._finish(seq)
                finished.append(seq)
                continue
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is None:
                continue
            seq.finish_reason = reason
            if seq.keep_kv and seq.num_computed < seq.num_tokens:
                seq.closing = True  # one more step computes the last token's KV
            else:
                self._finish(seq)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        # ignore_eos passes over the model's own end tokens only, as in vLLM: the tokens
        # the request names still stop it.
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if p.stop and self._cut_at_stop(seq):
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens:
            return "length"
        return None

    def _cut_at_stop(self, seq: Sequence) -> bool:
        """If a stop string has just appeared in the answer's text, end the answer before it
        and say so."""
        tail_ids = seq.completion_token_ids[-stop_window(seq.params.stop) :]
        tail = self.detokenize(tail_ids)
        found = [tail.find(s) for s in seq.params.stop if s in tail]
        if not found:
            return False
        start = min(found)
        # Keep the tokens whose text ends before the stop string (the newest one never does:
        # the string was not there a step ago); the rest of the text before it is the tail.
        keep = len(tail_ids) - 1
        while len(kept := self.detokenize(tail_ids[:keep])) > start:
            keep -= 1
        seq.stop_tail = tail[len(kept) : start]
        del seq.token_ids[seq.num_tokens - len(tail_ids) + keep :]
        seq.num_computed = seq.num_tokens  # every kept token's KV is computed already
        return True

    def _finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self._let_go(seq)

    def _let_go(self, seq: Sequence) -> None:
        """Free what a finished sequence no longer needs: its hold on the KV it attended to,
        and every block, or with keep_kv the blocks reserved for tokens it never computed.
        Blocks it wrote nothing to are given back, reopening a tail it continued in."""
        for segment in seq.context:
            self.blocks.release(segment.blocks)
        if seq.keep_kv and seq.num_computed:
            keep = self.blocks.blocks_needed(seq.start, seq.num_computed)
            self.blocks.release(seq.blocks[keep:])
            del seq.blocks[keep:]
        else:
            self.blocks.give_back(seq.blocks, seq.start)
            seq.blocks.clear()

    def abort(self, seq: Sequence) -> None:
        """Stop a request now; with keep_kv its computed tokens' KV stays with it."""
        seq.finish_reason = seq.finish_reason or "abort"
        if seq in self.running:
            self._finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self._let_go(seq)
        seq.status = Status.FINISHED
