"""ContextManager: the in-process API. Everything is a chunk; a named context says which
chunks the model sees; generation turns the prompt and the answer into chunks too."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from kvchunks.common import (
    InvalidInput,
    OnProgress,
    part_by_layer,
    read_text_file,
)
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.service import exchange, generation
from kvchunks.service.catalog import Catalog, check_fits
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.chunks import Hold, check_metadata
from kvchunks.service.context_settings import call_mode
from kvchunks.service.conversation import (
    checked_messages,
    held_context,
    message_chunks,
    message_tokens,
)
from kvchunks.service.generation import Call, GenerationResult
from kvchunks.service.output_tracking import OutputTracker, OutputTracking
from kvchunks.service.pieces import spans_of
from kvchunks.service.text_parts import split_text
from kvchunks.store.chunk import ChunkInfo
from kvchunks.vocabulary import (
    TIERS,
    check_callback,
    check_flag,
    check_prompt,
    check_text,
    checked_refs,
    checked_tags,
    is_count,
)


class ContextManager(OutputTracking, Catalog):
    """Chunks, one named activation set over them, and generation with that set.

    The catalog's operations (listing, lookup, tags, activation, settings) see this
    manager's pool: a chunk's tier and segments are the pool's, and an activation starts a
    prefetch."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        context: str = "default",
        home: str | Path | None = None,
        redis_url: str | None = None,
        engine_config: EngineConfig | None = None,
        store: ChunkStore | None = None,
        **settings,
    ):
        self._owns_store = store is None
        self.store = store or ChunkStore(
            model, home=home, redis_url=redis_url, engine_config=engine_config
        )
        Catalog.__init__(
            self,
            self.store.registry,
            context,
            window=lambda: self.store.model.window,
            opening=lambda: self.store.composer.opening_length,
            describe=self.store.views.describe_many,
            on_activate=self.store.prefetcher.on_activate,
            dtype=self.store.model.engine_config.dtype,
        )
        self._trackers: list[OutputTracker] = []
        self.last_generation: GenerationResult | None = None
        if settings:
            self.configure(**settings)

    def close(self) -> None:
        """Free this manager's pool blocks (only if it made its own store)."""
        if self._owns_store:
            self.store.close()

    def with_context(self, context: str, **settings) -> ContextManager:
        """Another context over the same chunk pool."""
        return ContextManager(context=context, store=self.store, **settings)

    # -- chunks -----------------------------------------------------------------------------

    def add_chunk(
        self,
        text: str,
        role: str = "system",
        tags: list[str] | None = None,
        metadata: dict | None = None,
    ) -> ChunkInfo:
        """A standalone chunk of `text`, framed as a `role` turn; its KV is computed now."""
        tokens = self._framed(text, role)
        self._check_fits(len(tokens), "split the text into several chunks")
        tags = checked_tags(tags)
        metadata = check_metadata({} if metadata is None else metadata)
        return self._add_framed(tokens, text, role, tags, {"source": "text", **metadata})

    def load_file(
        self,
        path: str | Path,
        role: str = "system",
        tags: list[str] | None = None,
        split_tokens: int | None = None,
        on_progress: OnProgress | None = None,
    ) -> ChunkInfo | list[ChunkInfo]:
        """A chunk of a UTF-8 text file, or with `split_tokens` several: the text cut into
        parts of at most that many tokens, at paragraph ends where they fit, else at sentence
        ends (see text_parts). Each part is the standalone chunk of its text.

        `on_progress(done, total)` is told the tokens computed (or found stored) so far, out
        of the file's: 0 before the first part, after each layer of a part's prefill (a part
        is one pass: its tokens count in proportion to the layers done), and once each part
        is stored. Nothing is computed unless every part fits the context window."""
        text = read_text_file(path)
        if split_tokens is not None and not (is_count(split_tokens) and split_tokens > 0):
            raise InvalidInput("split_tokens must be a positive number of tokens")
        tags = checked_tags(tags)
        check_callback("on_progress", on_progress)
        parts = [text] if split_tokens is None else self._split(text, split_tokens)
        framed = [self._framed(part, role) for part in parts]
        too_long = "load it in parts of at most N tokens with --split N (split_tokens=N)"
        if split_tokens is not None:
            too_long = f"give --split a number smaller than {split_tokens}"
        self._check_fits(max(map(len, framed)), too_long)
        source = {"source": str(Path(path).resolve())}
        made, done, total = [], 0, sum(map(len, framed))
        report = on_progress or (lambda done, total: None)
        report(0, total)
        llm = self.store.model.llm
        for i, (part, tokens) in enumerate(zip(parts, framed, strict=True)):
            numbered = {} if split_tokens is None else {"part": i, "parts": len(parts)}
            by_layer = part_by_layer(report, done, len(tokens), total)
            with llm.layer_progress(by_layer) if on_progress else nullcontext():
                made.append(self._add_framed(tokens, part, role, tags, source | numbered))
            done += len(tokens)
            report(done, total)
        return made if split_tokens is not None else made[0]

    def _split(self, text: str, max_tokens: int) -> list[str]:
        tok = self.store.model.tokenizer
        return split_text(text, max_tokens, lambda t: len(tok.encode(t, add_special_tokens=False)))

    def _framed(self, text: str, role: str) -> list[int]:
        return self.store.model.chat.frame(role, check_text(text))

    def _add_framed(
        self, tokens: list[int], text: str, role: str, tags: list[str], meta: dict
    ) -> ChunkInfo:
        maker = self.store.maker
        with self.store.put_back_if_interrupted(), maker.holding() as hold:
            chunk, _ = maker.compute(
                tokens, [], "reuse", hold=hold, role=role, kind="input", text=text, metadata=meta
            )
            maker.keep(hold, [chunk])  # it may be a message a request made and will take back
        for tag in tags:
            chunk = self.registry.add_tag(chunk.hash, tag)
        return self._view(chunk.hash)

    def stats(self) -> dict:
        """Pool usage, chunks per tier, the store's counters and the last generation's speed."""
        stats = self.store.views.stats(self.list_chunks())
        last = self.last_generation
        stats["last_generation"] = last and {
            "tokens": len(last.token_ids),
            "ttft_s": last.ttft_s,
            "tokens_per_s": last.tokens_per_s,
            "interrupted": last.interrupted,
        }
        return stats

    def delete_chunk(self, ref: str, cascade: bool = False) -> list[str]:
        """Delete a chunk for good; views over it are refused unless cascade. Returns hashes."""
        return self.delete_chunks([ref], cascade)

    def delete_chunks(self, refs: list[str], cascade: bool = False) -> list[str]:
        """delete_chunk of several chunks, all or none: each is found, and none is read by a
        view left standing, before any is deleted. Returns hashes."""
        chunks = [self.registry.find(ref) for ref in checked_refs(refs)]
        return self.store.maker.delete(chunks, check_flag("cascade", cascade))

    def compose_chunks(self, refs: list[str], tags: list[str] | None = None) -> ChunkInfo:
        """One chunk that reads the given chunks' KV in order (a view: nothing is copied)."""
        if len(checked_refs(refs)) < 2:
            raise InvalidInput("compose needs at least two chunks")
        chunks = [self.registry.find(r) for r in refs]
        self.store.model.check_dtype(chunks)
        self._check_fits(_tokens(chunks), "compose fewer chunks, or shorter ones")
        tags = checked_tags(tags)
        return self._view(self.store.maker.make_view("composed", spans_of(chunks), tags=tags).hash)

    def split_chunk(self, ref: str, at: int) -> tuple[ChunkInfo, ChunkInfo]:
        """Two views of the chunk, split before token `at`."""
        chunk = self.registry.find(ref)
        self.store.model.check_dtype([chunk])
        if not is_count(at):
            raise InvalidInput(f"split point must be a whole number, got {at!r}")
        if not 0 < at < chunk.token_count:
            raise InvalidInput(f"split point must be between 1 and {chunk.token_count - 1}")
        head, tail = self.store.maker.split(chunk, at)
        return self._view(head.hash), self._view(tail.hash)

    def populate(self, ref: str) -> ChunkInfo:
        """Bring the chunk's KV into the pool now (from its file, or recomputed)."""
        return self.move_to_gpu(ref)

    # -- tiers ------------------------------------------------------------------------------

    def move_to_gpu(self, ref: str) -> ChunkInfo:
        """Put the chunk's KV in the engine's pool (a view: its sources')."""
        return self.move_chunks([ref], "gpu")[0]

    def move_to_cpu(self, ref: str) -> ChunkInfo:
        """Keep the chunk's KV in host memory, freeing its pool blocks."""
        return self.move_chunks([ref], "cpu")[0]

    def archive_to_disk(self, ref: str) -> ChunkInfo:
        """Keep the chunk's KV only in its file, freeing pool blocks and host memory."""
        return self.move_chunks([ref], "disk")[0]

    def move_chunks(
        self, refs: list[str], tier: str, on_progress: OnProgress | None = None
    ) -> list[ChunkInfo]:
        """Move chunks' KV to `tier` (gpu, cpu or disk), one after another. Every ref is found,
        and for cpu the chunks checked to fit host memory together, before anything moves.
        `on_progress(done, total)` is told the bytes of KV moved so far: 0, then after each."""
        if tier not in TIERS:
            raise InvalidInput(f"no tier {tier!r}: choose one of {', '.join(TIERS)}")
        if not checked_refs(refs):
            raise InvalidInput("move needs at least one chunk")
        check_callback("on_progress", on_progress)
        found = (self.registry.find(ref, self.context_name) for ref in refs)
        chunks = list({c.hash: c for c in found}.values())  # each once: two refs may name one
        self.store.move(chunks, tier, on_progress)
        return [self.store.views.describe(chunk) for chunk in chunks]  # once all have moved

    def prefetch(self, ref: str) -> ChunkInfo:
        """Start bringing the chunk's KV into the pool in the background."""
        chunk_hash = self.registry.resolve(ref)
        self.store.prefetcher.prefetch(chunk_hash)
        return self._view(chunk_hash)

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        mode: str | None = None,
        on_text: Callable[[str], None] | None = None,
        recompute: float | None = None,
        check_stop: Callable[[], None] | None = None,
    ) -> GenerationResult:
        """Answer `prompt` attending to the active chunks; the prompt and the answer become
        chunks whose parents are the active chunks (and, for the answer, the prompt).

        mode and recompute default to the context's settings; recompute (realign only) is
        the fraction of the composed chunks' tokens whose KV is computed again in order.
        on_text gets the answer's text as it comes. check_stop is called between the model's
        layers until the first token, then after each token: what it (or on_text) raises ends
        the call, keeping nothing, or with KeyboardInterrupt the answer so far (a Ctrl-C)."""
        check_prompt(prompt)
        settings = self.settings
        mode, recompute = call_mode(settings, mode, recompute)
        call = Call(settings, mode, recompute, params, on_text, check_stop=check_stop)
        prompt_tokens = self.store.model.chat.prompt(prompt)
        with self.store.maker.holding() as hold, generation.stop_checks(self.store, call):
            active, _ = held_context(self.store, self.context_name, hold, [])
            self.store.model.check_dtype(active)
            self._check_fits(_tokens(active) + len(prompt_tokens) + self._answer_room(call), active)
            result = self._answer(prompt, prompt_tokens, active, call, hold)
            self.store.maker.keep(hold, [result.prompt_chunk, *result.output_chunks])
        self._auto_activate(settings, [result.prompt_chunk, *result.output_chunks])
        return self._finished(result)

    def chat(
        self,
        messages: list[dict],
        params: SamplingParams | None = None,
        mode: str | None = None,
        on_text: Callable[[str], None] | None = None,
        recompute: float | None = None,
        chunks: list[str] | None = None,
        store: bool = True,
        check_stop: Callable[[], None] | None = None,
    ) -> GenerationResult:
        """Answer a conversation sent whole, as OpenAI clients send it: {"role", "content"}
        messages, the last one the user's. The model attends to the active chunks, then
        `chunks` (for this call only), then each earlier message as a chunk computed after
        what precedes it; stored ones are used again, so a conversation resent with one more
        message computes only that message. With store=False nothing of the call is kept.
        Under the context's auto_activate the messages, prompt and answer join the active
        chunks (for clients that send only the new message, as the web page does). on_text
        and check_stop as in `generate`."""
        turns = checked_messages(messages)
        refs = checked_refs(chunks or [])
        settings = self.settings
        mode, recompute = call_mode(settings, mode, recompute)
        call = Call(settings, mode, recompute, params, on_text, store, check_stop)
        chat = self.store.model.chat
        tokens = message_tokens(chat, turns)
        prompt_tokens = chat.prompt(turns[-1].content)
        framed = sum(map(len, tokens)) + len(prompt_tokens)
        made: list[ChunkInfo] = []  # the messages' chunks this call computes
        result = None
        maker = self.store.maker
        with maker.holding() as hold, generation.stop_checks(self.store, call):
            active, before = held_context(self.store, self.context_name, hold, refs)
            self._check_fits(_tokens(before) + framed + self._answer_room(call), active)
            self.store.model.check_dtype(before)
            try:
                messages_kv = message_chunks(
                    self.store, self.context_name, turns, tokens, before, call, made, hold
                )
                active = [*before, *messages_kv]
                result = self._answer(turns[-1].content, prompt_tokens, active, call, hold)
            finally:
                # A refused call changes nothing, and with store=False none is kept: what
                # this call made goes again, newest first.
                if result is None or not store:
                    fresh = [] if result is None or result.prompt_reused else [result.prompt_chunk]
                    maker.take_back([*fresh, *reversed(made)])
            kept = [*messages_kv, result.prompt_chunk, *result.output_chunks] if store else []
            maker.keep(hold, kept)
        made_tokens = sum(c.token_count for c in made)  # computed now, not reused
        result.tokens_reused -= made_tokens
        result.tokens_recomputed += made_tokens
        if store:
            self._auto_activate(settings, kept)
        return self._finished(result, described=store)

    def _auto_activate(self, settings: dict, chunks: list[ChunkInfo]) -> None:
        """Under auto-activate, what a call stored joins the active chunks, in order."""
        if settings["auto_activate"]:
            for chunk in chunks:
                self.activate_chunk(chunk.hash)

    def _answer(
        self, prompt: str, prompt_tokens: list[int], active: list[ChunkInfo], call: Call, hold: Hold
    ) -> GenerationResult:
        """The answer to a prompt whose tokens, with `active` and the answer's room, were
        checked to fit the window and to be of the model's dtype."""
        tracked = bool(self._trackers)
        request = call.request(self.context_name, prompt, prompt_tokens, active, tracked)
        return generation.generate(self.store, request, call, hold)

    def _finished(self, result: GenerationResult, described: bool = True) -> GenerationResult:
        """The result as the caller sees it (chunks read for this context), tracked."""
        if described:
            result.prompt_chunk = self._view(result.prompt_chunk.hash)
            result.output_chunks = [self._view(c.hash) for c in result.output_chunks]
            result.output_chunk = result.output_chunks[-1] if result.output_chunks else None
        for tracker in self._trackers:
            tracker.chunks += result.output_chunks
        self.last_generation = result
        return result

    # -- files ------------------------------------------------------------------------------

    def export_chunk(self, ref: str, path: str | Path, force: bool = False) -> Path:
        """Write one chunk (tokens, record and KV) to a file another data directory can import.

        A relative path lands in `<home>/exports`; it may not climb out of it.
        """
        return exchange.export_chunk(self.store, self.registry.find(ref), path, force)

    def import_chunk(self, path: str | Path) -> ChunkInfo:
        """Add a chunk exported from a data directory of the same model, dtype and shapes."""
        return self.get_chunk(exchange.import_chunk(self.store, path))

    # -- helpers ----------------------------------------------------------------------------

    def _answer_room(self, call: Call) -> int:
        """Tokens an answer may take: max_tokens, then the tokens that close it the way the
        chat template closes a turn (stored with it, and active with it under auto-activate)."""
        return call.sampling.max_tokens + len(self.store.model.chat.turn_end)

    def _check_fits(self, tokens: int, remedy: str | list[ChunkInfo]) -> None:
        opening = self.store.composer.opening_length
        check_fits(tokens, self.store.model.window, opening, remedy)


def _tokens(chunks: list[ChunkInfo]) -> int:
    return sum(c.token_count for c in chunks)
