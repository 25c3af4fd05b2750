"""The engine's front door: vLLM-style `LLM(path).generate(prompts, SamplingParams(...))`,
plus the lower-level calls the chunk store builds on (prefill against stored segments)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Seq
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from threading import RLock

import torch
from transformers import AutoTokenizer

from kvchunks.common import ContextWindowExceeded, InvalidInput
from kvchunks.engine.block_manager import BlockManager, Key
from kvchunks.engine.checkpoint import resolve_model
from kvchunks.engine.config import EngineConfig, ModelConfig
from kvchunks.engine.kv_copy import CopyStream, gather, gather_to_host, scatter
from kvchunks.engine.kv_segment import KVSegment, slice_segments
from kvchunks.engine.model_runner import ModelRunner
from kvchunks.engine.rotary import cos_sin, rotate
from kvchunks.engine.sampler import sample
from kvchunks.engine.sampling_params import SamplingParams
from kvchunks.engine.scheduler import Scheduler
from kvchunks.engine.sequence import Sequence
from kvchunks.engine.stop_strings import stop_window

Prompt = str | list[int] | list[dict]
LOCK_POLL_S = 0.02  # how often a thread waiting for the lock looks for tokens (see steps)


@dataclass
class RequestOutput:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None
    segment: KVSegment | None = None  # prompt + answer KV, kept only when asked (keep_kv)


@dataclass
class PrefillResult:
    segment: KVSegment  # the new tokens' KV; the caller owns it (release with LLM.release)
    logits: torch.Tensor  # [1, vocab] for the last token, or [n, vocab] with all_logits


class LLM:
    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None):
        self.path = resolve_model(model)
        self.config = config or EngineConfig()
        self.model_config = ModelConfig.from_folder(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.runner = ModelRunner(self.path, self.model_config, self.config)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size)
        self.copies = CopyStream(self.runner.kv_cache.device)  # tier moves on CUDA
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.scheduler = Scheduler(self.config, self.block_manager, self.eos_token_ids, self.decode)

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_position_embeddings

    # -- prompts -------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a string, a token-id list, or chat messages (template applied)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if prompt and isinstance(prompt[0], dict):
            ids = self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids)
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise InvalidInput("a prompt is a string, a list of token ids, or a list of chat messages")

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched continuously; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and not isinstance(prompts[0], (str, list))):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        seqs: list[Sequence] = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                seqs.append(self.add_request(self.encode(prompt), sp))
            while not self.scheduler.is_finished():
                self.step()
        except BaseException:  # none of them stays queued to wedge the next caller
            for seq in seqs:
                self.abort(seq)
            raise
        return [self._output(s) for s in seqs]

    def add_request(
        self,
        token_ids: list[int],
        params: SamplingParams,
        context: Seq[KVSegment] = (),
        position: int | None = None,
        keep_kv: bool = False,
        continue_after: KVSegment | None = None,
        reserve: bool = False,
        context_token_ids: Seq[int] = (),
    ) -> Sequence:
        """Queue a request that attends to `context` segments, then to its own tokens.

        With keep_kv the KV of the prompt and the answer stays in the pool when it finishes
        (`own_segment()`, owned by the caller). continue_after lets its tokens share the last
        block of that segment when they follow it directly, so chunks need not waste blocks.
        reserve allocates the blocks of the whole answer now (CapacityError if they are not
        free), so nothing else that allocates from the pool meanwhile can starve it; the
        blocks it does not use are freed when it finishes. context_token_ids are the tokens
        of `context`, which repetition_penalty counts.
        """
        if not token_ids:
            raise InvalidInput("empty prompt: give at least one token")
        seq = Sequence(token_ids, params, context, position, keep_kv, tuple(context_token_ids))
        self._check_window(seq.position + len(token_ids) + params.max_tokens)
        reserved = len(token_ids) + params.max_tokens if reserve else 0
        with self._claim(continue_after, reserved) as (seq.blocks, seq.start):
            seq.reserved = reserve
            self.scheduler.add(seq)
        return seq

    @contextmanager
    def _claim(self, after: KVSegment | None, num_tokens: int) -> Iterator[tuple[list[int], int]]:
        """Blocks for num_tokens new tokens, starting in the open tail of `after` when it has
        one, and the slot they start at. Given back if the block raises (Ctrl-C, out of
        memory, a full pool): nobody owns them yet."""
        blocks, start = self.block_manager.continue_after(after)
        try:
            self.block_manager.grow(blocks, start, num_tokens)
            yield blocks, start
        except BaseException:
            self.block_manager.give_back(blocks, start)
            raise

    def step(self) -> list[Sequence]:
        """Run one scheduled batch (prefill or decode); return sequences that finished."""
        seqs = self.scheduler.schedule()
        if not seqs:
            raise InvalidInput("the KV pool cannot hold even one running request")
        return self._run_step(seqs)

    def _run_step(self, seqs: list[Sequence]) -> list[Sequence]:
        logits = self.runner.run(seqs)
        # A prompt computed in pieces samples nothing until its last piece (a seed's
        # generator must not move on for the others).
        rows = [i for i, seq in enumerate(seqs) if seq.catches_up]
        tokens = sample(logits[rows], [seqs[i] for i in rows]) if rows else []
        finished = self.scheduler.postprocess(seqs, tokens)
        for seq in finished:
            if seq.keep_kv:
                self.block_manager.seal(seq.own_segment())
        return finished

    def steps(self, seq: Sequence, lock: RLock | None = None) -> Iterator[None]:
        """Run the engine until seq finishes, yielding after each step that changed its tokens
        or finished it. With a lock, each step holds it, so other threads may use the pool
        between steps; while another thread holds it (its own steps, or stored KV computed in
        pieces with steps between them), what those steps give seq is yielded as it comes."""
        while not seq.is_finished:
            before = seq.num_tokens
            if lock is None:
                self.step()
            elif lock.acquire(timeout=LOCK_POLL_S):
                try:
                    if not seq.is_finished:  # another thread's step may have finished it
                        self.step()
                finally:
                    lock.release()
            if seq.num_tokens != before or seq.is_finished:
                yield

    def stream(self, seq: Sequence, lock: RLock | None = None) -> Iterator[int]:
        """Run the engine until seq finishes, yielding each new token of seq once it is
        settled: while a stop string may still appear, the newest tokens it could cut away
        wait (see steps for the lock)."""
        emitted = seq.num_completion_tokens
        for _ in self.steps(seq, lock):
            tokens = seq.completion_token_ids
            settled = len(tokens)
            if seq.params.stop and not seq.is_finished:
                settled += 1 - stop_window(seq.params.stop)
            if settled > emitted:
                yield from tokens[emitted:settled]
                emitted = settled

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)
        if seq.keep_kv:
            self.block_manager.seal(seq.own_segment())

    # -- stored KV -----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        token_ids: list[int],
        context: Seq[KVSegment] = (),
        position: int | None = None,
        all_logits: bool = False,
        continue_after: KVSegment | None = None,
        pack: bool = False,
    ) -> PrefillResult:
        """Compute and keep the KV of token_ids attending to the stored `context` segments,
        in pieces of a step's budget with the running answers' steps between them.

        Positions start at `position` (default: right after the context). The returned
        segment's blocks belong to the caller. With pack, the KV may start in a block other
        packed KV partly fills (for chunks nothing is computed after in their blocks)."""
        if not token_ids:
            raise InvalidInput("nothing to prefill: empty token list")
        seq = Sequence(token_ids, SamplingParams(temperature=0), context, position, keep_kv=True)
        self._check_window(seq.position + len(token_ids))
        with self._claim(self._after(continue_after, pack), len(token_ids)) as claimed:
            seq.blocks, seq.start = claimed
            logits = self._prefill_in_pieces(seq, all_logits)
        segment = seq.own_segment()
        self.block_manager.seal(segment, packed=pack)
        return PrefillResult(segment, logits)

    def _prefill_in_pieces(self, seq: Sequence, all_logits: bool) -> torch.Tensor:
        logits = []  # a step's budget of seq's tokens at a time
        while seq.num_uncomputed:
            if seq.num_computed:
                self._step_between_pieces()
            seq.num_scheduled = min(seq.num_uncomputed, self.scheduler.max_num_batched_tokens)
            logits.append(self.runner.run([seq], all_logits=all_logits))
            seq.num_computed += seq.num_scheduled
        return torch.cat(logits) if all_logits else logits[-1]

    def _step_between_pieces(self) -> None:
        """A step of the scheduler's work, if any fits, between two pieces of stored KV (a
        document, a composition): it holds the running answers up no longer than a step."""
        if seqs := self.scheduler.schedule():
            self._run_step(seqs)

    def layer_progress(self, on_layer: Callable[[int, int], None]) -> AbstractContextManager:
        """`on_layer(done, layers)` after each layer of this thread's passes within the block
        (see CausalLM.layer_progress)."""
        return self.runner.model.layer_progress(on_layer)

    @torch.inference_mode()
    def place(self, segments: Seq[KVSegment], position: int) -> KVSegment:
        """A copy of the segments' KV in new blocks, as one run of tokens from `position` on,
        owned by the caller. Each segment's keys are re-rotated once from the positions they
        were computed at to where they land (RoPE composes: R(p') = R(p' - p) R(p)), so the
        copy is attended as plain contiguous KV."""
        k, v = self.read_kv(segments)
        deltas, at = [], position
        for segment in segments:
            deltas.append(torch.full((segment.length,), at - segment.position))
            at += segment.length
        shifts = torch.cat(deltas).to(self.runner.device)
        cos, sin = cos_sin(self.runner.inv_freq, shifts, self.config.torch_dtype)
        return self.write_kv(rotate(k, cos, sin), v, position)

    def recompute(
        self,
        target: KVSegment,
        token_ids: list[int],
        indices: list[int],
        context: Seq[KVSegment] = (),
    ) -> None:
        """Compute again, in place, the KV of target's tokens at `indices` (sorted), each
        attending to `context` and to target's tokens up to it, with the other tokens' KV as
        stored (CacheBlend's fusion: the chosen tokens take in what they missed; all of them
        chosen equals a full prefill). The caller must own target's blocks alone."""
        if not indices:
            return
        if any(s.shift for s in context):
            raise InvalidInput("recompute reads its context as stored: no shifted segments")
        self._check_window(target.position + target.length)
        own = self.runner.segment_slots(target)
        keys = torch.cat([*(self.runner.segment_slots(s) for s in context), own])
        budget = self.scheduler.max_num_batched_tokens
        for first in range(0, len(indices), budget):  # a later piece reads the earlier ones'
            if first:  # new KV, as later tokens of one pass would
                self._step_between_pieces()
            piece = indices[first : first + budget]
            chosen = torch.tensor(piece, device=self.runner.device)
            self.runner.recompute(
                [token_ids[i] for i in piece],
                target.position + chosen,
                own[chosen],
                keys,
                keys.numel() - own.numel() + chosen,
            )

    # -- KV handles: what callers above the engine hold, without block arithmetic ---------

    def blocks_for(
        self, num_tokens: int, after: KVSegment | None = None, pack: bool = False
    ) -> int:
        """New pool blocks that `num_tokens` tokens take: starting afresh, (after) directly
        following a segment in the open tail of its last block, or packed."""
        return self.block_manager.blocks_to_follow(self._after(after, pack), num_tokens)

    def _after(self, segment: KVSegment | None, pack: bool) -> KVSegment | None:
        """Whose open tail new KV starts in: the last packed KV's when packing."""
        return self.block_manager.last_packed if pack else segment

    def fewest_to_release(
        self, candidates: Iterable[tuple[Key, Seq[KVSegment]]], blocks: int
    ) -> list[Key] | None:
        """The shortest prefix of `candidates` (a key and the segments it holds, in the order
        they may go) whose release frees `blocks` pool blocks; None if all of them would not."""
        return self.block_manager.fewest_to_release(candidates, blocks)

    def slice(self, segments: Seq[KVSegment], start: int, length: int) -> list[KVSegment]:
        """Tokens [start, start + length) of the segments' concatenation (no copy, no
        references taken: valid while the segments are held)."""
        return slice_segments(list(segments), start, length, self.config.block_size)

    def share(self, segments: Seq[KVSegment], start: int, length: int) -> list[KVSegment]:
        """`slice`, with references taken: the caller owns the result and `release`s it."""
        part = self.slice(segments, start, length)
        for segment in part:
            self.retain(segment)
        return part

    def retain(self, segment: KVSegment) -> None:
        self.block_manager.retain(segment.blocks)

    def release(self, segment: KVSegment) -> None:
        self.block_manager.release(segment.blocks)

    def pool_usage(self) -> dict[str, int]:
        bm = self.block_manager
        return {"blocks": bm.num_blocks, "free": bm.num_free, "block_size": bm.block_size}

    def read_kv(
        self, segments: Seq[KVSegment], buffer: Callable[[int], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the segments' K and V in token order, each [layers, tokens, kv_heads,
        head_dim] (see kv_copy).

        `buffer(nbytes)`, when given, provides the memory to copy into (a flat uint8 tensor,
        such as host memory for the cpu tier); else the copies are on the pool's device.
        """
        pool = self._flat_pool()
        shape = (2, pool.shape[1], sum(s.length for s in segments), *pool.shape[3:])
        if buffer is None:
            out = pool.new_empty(shape)
            gather(pool, segments, self.config.block_size, out)
        else:
            out = buffer(math.prod(shape) * pool.element_size()).view(pool.dtype).view(shape)
            gather_to_host(pool, segments, self.config.block_size, out, self.copies)
        return out[0], out[1]

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, position: int, pack: bool = False
    ) -> KVSegment:
        """Put K and V [layers, tokens, kv_heads, head_dim] into new pool blocks (packed: as
        in `prefill`)."""
        n = k.shape[1]
        with self._claim(self._after(None, pack), n) as (blocks, start):
            segment = KVSegment(tuple(blocks), start, n, position)
            scatter(self._flat_pool(), segment, self.config.block_size, k, v, self.copies)
        self.block_manager.seal(segment, packed=pack)
        return segment

    def _flat_pool(self) -> torch.Tensor:
        """The pool as [2, layers, slots, kv_heads, head_dim] (a view)."""
        return self.runner.kv_cache.flatten(2, 3)

    def _check_window(self, total: int) -> None:
        if total > self.max_model_len:
            raise ContextWindowExceeded(
                f"{total} tokens exceed the model's context window of {self.max_model_len}"
            )

    def _output(self, seq: Sequence) -> RequestOutput:
        tokens = seq.completion_token_ids
        return RequestOutput(
            text=self.decode(tokens) + seq.stop_tail,
            token_ids=tokens,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            finish_reason=seq.finish_reason,
            segment=seq.own_segment() if seq.keep_kv else None,
        )
