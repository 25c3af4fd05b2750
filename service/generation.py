"""One generation, start to end: the prompt becomes a chunk computed after the active chunks
(or the stored one is reused), the answer is decoded in the same sequence, and its KV becomes
output chunk(s) whose parents are the active chunks and the prompt."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvchunks.common import InvalidInput
from kvchunks.engine import LLM, SamplingParams
from kvchunks.engine.kv_segment import KVSegment
from kvchunks.engine.sequence import Sequence
from kvchunks.engine.stop_strings import held_back
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.chunks import Hold
from kvchunks.service.compose import AttentionContext
from kvchunks.store.chunk import ChunkInfo, ChunkRecord
from kvchunks.vocabulary import DEFAULT_MODE, check_callback, check_flag, recompute_fraction


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_chunk: ChunkInfo
    output_chunk: ChunkInfo | None  # the last of output_chunks; None for an empty answer
    output_chunks: list[ChunkInfo]
    finish_reason: str | None
    interrupted: bool = False
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    mode: str = DEFAULT_MODE  # the mode asked for (all agree when the context is one timeline)
    recompute: float | None = None  # the fraction realign recomputed (None: another mode)
    # Active-context tokens whose KV was used as stored (or derived by an earlier
    # generation), and those computed for this generation; the prompt is not counted.
    tokens_reused: int = 0
    tokens_recomputed: int = 0
    prompt_reused: bool = False  # the prompt chunk was stored: only its last token was computed

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "interrupted": self.interrupted,
            "ttft_s": self.ttft_s,
            "tokens_per_s": self.tokens_per_s,
            "token_count": len(self.token_ids),
            "mode": self.mode,
            "recompute": self.recompute,
            "tokens_reused": self.tokens_reused,
            "tokens_recomputed": self.tokens_recomputed,
            "prompt_reused": self.prompt_reused,
            "prompt_chunk": self.prompt_chunk.to_json(),
            "output_chunk": self.output_chunk.to_json() if self.output_chunk else None,
            "output_chunks": [c.to_json() for c in self.output_chunks],
        }


@dataclass
class Request:
    context: str
    prompt: str
    prompt_tokens: list[int]
    active: list[ChunkInfo]
    params: SamplingParams
    mode: str
    recompute: float | None
    output_tokens: int | str | None  # chunk size of the answer; "manual": not stored
    keep_manual: bool  # an output tracker wants the answer even when output_tokens="manual"


@dataclass
class Call:
    """One generate or chat call's choices: the context's settings as read once at its
    start, the mode and recompute fraction they give, and the caller's arguments, checked
    before any work; and whether its answer has begun (see stop_checks)."""

    settings: dict
    mode: str
    recompute: float | None
    params: SamplingParams | None
    on_text: Callable[[str], None] | None
    store: bool = True
    check_stop: Callable[[], None] | None = None
    answering: bool = field(default=False, init=False)  # the answer's first token has come

    def __post_init__(self) -> None:
        if self.params is not None:
            if not isinstance(self.params, SamplingParams):
                kind = type(self.params).__name__
                raise InvalidInput(f"params must be SamplingParams, got {kind}")
            # Checked again, as a copy of its own (lists too): a field may have been set since
            # it was made (params are a plain dataclass, as vLLM's are), or be while it runs.
            self.params = dataclasses.replace(copy.deepcopy(self.params))
        check_callback("on_text", self.on_text)
        check_callback("check_stop", self.check_stop)
        check_flag("store", self.store)

    @property
    def sampling(self) -> SamplingParams:
        """The sampling asked for, else greedy answers of up to 256 tokens."""
        return self.params or SamplingParams(temperature=0, max_tokens=256)

    def request(
        self,
        context: str,
        prompt: str,
        prompt_tokens: list[int],
        active: list[ChunkInfo],
        tracked: bool,
    ) -> Request:
        """The request answering `prompt` over `active` in `context`; `tracked`: an output
        tracker wants the answer, stored or not."""
        return Request(
            context,
            prompt,
            prompt_tokens,
            active,
            self.sampling,
            self.mode,
            self.recompute,
            self.settings["output_tokens"] if self.store else "manual",
            keep_manual=self.store and tracked,
        )


@contextlib.contextmanager
def stop_checks(store: ChunkStore, call: Call) -> Iterator[None]:
    """Within the block, check_stop runs between the model's layers in this thread until the
    answer's first token: a call whose caller has gone stops within a layer of a long
    prefill (its context's composition, earlier messages, the prompt), not after it."""
    if call.check_stop is None:
        yield
        return

    def between_layers(_done: int, _layers: int) -> None:
        if not call.answering:
            call.check_stop()

    with store.model.llm.layer_progress(between_layers):
        yield


def generate(store: ChunkStore, request: Request, call: Call, hold: Hold) -> GenerationResult:
    """Answer the request attending to its active chunks; store the prompt and answer. The
    call holds the prompt chunk, whether it is new or found stored."""
    tiers, maker, composer = store.tiers, store.maker, store.composer
    store.model.llm  # noqa: B018  (starts the engine on first use: not part of the first token)
    started = time.perf_counter()
    active = request.active
    with contextlib.ExitStack() as pins:
        # Nothing this generation reads may be evicted meanwhile: the active chunks, and a
        # stored prompt it continues from.
        pins.enter_context(tiers.pins.pinning(active))
        with store.lock:
            ctx = composer.context_of(active, request.mode, request.recompute)
        try:
            record = maker.new_record(
                request.prompt_tokens,
                active,
                ctx.position,
                ctx.combine,
                request.mode,
                role="user",
                kind="input",
                text=request.prompt,
                metadata={"source": "prompt", "context": request.context},
            )
            pins.enter_context(tiers.pins.pinning([record]))
            # repetition_penalty counts the opening's and active chunks' tokens: the model
            # sees them.
            seen = (
                [*store.model.chat.opening, *(t for c in active for t in c.token_ids)]
                if request.params.penalized
                else []
            )
            with store.lock:
                store.maker.hold(hold, [record.hash])
                seq, fresh = _start(store, record, ctx, request.params, seen)
            skip = len(request.prompt_tokens) if fresh else 1
            answer, ttft, interrupted = _run(store, seq, call, started, skip)
            elapsed = time.perf_counter() - started
            with store.lock:
                prompt_chunk, prompt_kv = _store_prompt(store, record, seq, fresh, hold)
                try:
                    outputs = _store_answer(
                        store,
                        request,
                        seq,
                        skip,
                        [*active, prompt_chunk],
                        [*ctx.segments, *prompt_kv],
                        ctx.position + len(request.prompt_tokens),
                        ctx.combine,
                        interrupted,
                        hold,
                    )
                except BaseException:  # a refused call leaves nothing: nor its prompt
                    if fresh:
                        store.maker.take_back([prompt_chunk])
                    raise
        finally:
            composer.release(ctx)
    return GenerationResult(
        text=store.model.decode(answer) + seq.stop_tail,
        token_ids=answer,
        prompt_chunk=prompt_chunk,
        output_chunk=outputs[-1] if outputs else None,
        output_chunks=outputs,
        finish_reason=seq.finish_reason,
        interrupted=interrupted,
        ttft_s=ttft,
        tokens_per_s=(len(answer) - 1) / max(elapsed - ttft, 1e-9) if answer else 0.0,
        mode=request.mode,
        recompute=recompute_fraction(request.mode, request.recompute),
        tokens_reused=ctx.reused,
        tokens_recomputed=ctx.recomputed,
        prompt_reused=not fresh,
    )


def _start(
    store: ChunkStore,
    record: ChunkInfo,
    ctx: AttentionContext,
    params: SamplingParams,
    seen: list[int],
) -> tuple[Sequence, bool]:
    """Queue the answer: a new prompt is computed in the answer's own sequence, so its
    last logits give the first answer token; a stored prompt is reused and only its last
    token is computed again. `seen` are the context's tokens, for the penalties. Returns
    the sequence and whether the prompt is new."""
    llm, tiers = store.model.llm, store.tiers
    # The whole answer's blocks are taken now (reserve): background prefetches and other
    # contexts allocate from the same pool between this request's steps.
    if not store.registry.exists(record.hash):
        tiers.make_room(llm.blocks_for(record.token_count + params.max_tokens))
        seq = llm.add_request(
            record.token_ids,
            params,
            ctx.segments,
            ctx.position,
            True,
            reserve=True,
            context_token_ids=seen,
        )
        return seq, True
    prompt_kv = store.composer.segments(store.registry.get(record.hash))
    head = llm.slice(prompt_kv, 0, record.token_count - 1)
    tiers.make_room(llm.blocks_for(1 + params.max_tokens, after=prompt_kv[-1]))
    seq = llm.add_request(
        record.token_ids[-1:],
        params,
        [*ctx.segments, *head],
        ctx.position + record.token_count - 1,
        True,
        continue_after=prompt_kv[-1],
        reserve=True,
        context_token_ids=[*seen, *record.token_ids[:-1]] if params.penalized else (),
    )
    return seq, False


def _run(
    store: ChunkStore, seq: Sequence, call: Call, started: float, skip: int
) -> tuple[list[int], float, bool]:
    """Drive the engine until the answer is done; Ctrl-C (or on_text or check_stop raising
    KeyboardInterrupt) keeps what was sampled."""
    llm, ttft, shown, on_text = store.model.llm, 0.0, "", call.on_text
    try:
        for _ in llm.steps(seq, store.lock):
            ttft = ttft or time.perf_counter() - started
            call.answering = True
            if call.check_stop:
                call.check_stop()
            if on_text:
                shown = _show(on_text, shown, _answer_text(llm, seq))
        if on_text:  # what was held back, now that the answer is done
            _show(on_text, shown, _answer_text(llm, seq))
    except KeyboardInterrupt:
        with store.lock:
            llm.abort(seq)
        return seq.completion_token_ids, ttft, True
    except BaseException:  # nothing of the answer is stored: its KV goes
        with store.lock:
            llm.abort(seq)
            llm.release(seq.own_segment())
        raise
    return seq.completion_token_ids, ttft, False


def _answer_text(llm: LLM, seq: Sequence) -> str:
    """The answer's text so far; while it runs, without an ending that may begin a stop
    string (the stop string is never shown), nor a character whose bytes have not all come
    (it decodes as U+FFFD until they have: shown, it could not be taken back)."""
    text = llm.decode(seq.completion_token_ids) + seq.stop_tail
    return text if seq.is_finished else held_back(text.rstrip("\ufffd"), seq.params.stop)


def _show(on_text: Callable[[str], None], shown: str, text: str) -> str:
    """Pass on what `text` adds to what was shown; returns what is shown now."""
    if len(text) <= len(shown):
        return shown
    on_text(text[len(shown) :])
    return text


def _store_prompt(
    store: ChunkStore, record: ChunkInfo, seq: Sequence, fresh: bool, hold: Hold
) -> tuple[ChunkInfo, list[KVSegment]]:
    """The prompt chunk and its KV (from the answer's sequence when it was new). If it
    cannot be stored, the sequence's KV is let go."""
    llm = store.model.llm
    try:
        if fresh:
            own = seq.own_segment()
            if own.length < record.token_count:  # interrupted before the prompt was read
                raise KeyboardInterrupt
            store.maker.register(record, llm.share([own], 0, record.token_count), hold)
        chunk = store.registry.get(record.hash)
        return chunk, store.composer.segments(chunk)
    except BaseException:
        llm.release(seq.own_segment())
        raise


def _store_answer(
    store: ChunkStore,
    request: Request,
    seq: Sequence,
    skip: int,
    parents: list[ChunkInfo],
    context: list[KVSegment],
    position: int,
    combine: str,
    interrupted: bool,
    hold: Hold,
) -> list[ChunkInfo]:
    """Turn the answer's KV into output chunk(s), closed the way the chat template closes
    an assistant turn. The sequence's first `skip` own tokens are the prompt's."""
    llm = store.model.llm
    own = seq.own_segment()
    computed = seq.completion_token_ids[: max(own.length - skip, 0)]
    # An interrupted answer keeps every token shown, the last one sampled but not yet
    # computed; a finished one ends the way the chat template ends a turn.
    answer = seq.completion_token_ids if interrupted else computed
    granularity = request.output_tokens
    own_part = llm.slice([own], skip, len(computed))
    made: list[KVSegment] = []  # computed here; let go once each output holds its own part
    outputs: list[ChunkInfo] = []
    try:  # each output stored takes its own references; the sequence's are let go after
        if not answer or (granularity == "manual" and not request.keep_manual):
            return []
        closing = [] if interrupted else store.model.chat.close_answer(answer)
        rest = answer[len(computed) :] + closing
        if rest:
            store.tiers.make_room(llm.blocks_for(len(rest), after=own))
            made.append(
                llm.prefill(
                    rest, [*context, *own_part], position + len(computed), continue_after=own
                ).segment
            )
        kv, tokens = [*own_part, *made], computed + rest
        size = granularity if isinstance(granularity, int) else len(tokens)
        generation = {**request.params.to_dict(), "mode": request.mode}
        meta = {"source": "generation", "context": request.context, "interrupted": interrupted}
        starts = range(0, len(tokens), size)
        records: list[ChunkRecord] = []
        for start in starts:
            records.append(
                store.maker.new_record(
                    tokens[start : start + size],
                    [*parents, *records],
                    position + start,
                    combine,
                    request.mode,
                    role="assistant",
                    kind="output",
                    generation_params=generation,
                    metadata=meta,
                    text=llm.decode(tokens[start : start + size]),
                )
            )
        # Held before they are stored: a call keeping nothing may make them too.
        store.maker.hold(hold, [r.hash for r in records])
        for start, record in zip(starts, records, strict=True):
            part = llm.share(kv, start, min(size, len(tokens) - start))
            outputs.append(store.maker.register(record, part, hold))
    except BaseException:
        store.maker.take_back(outputs[::-1])
        raise
    finally:
        llm.release(own)
        store.tiers.free(made)
    return outputs
