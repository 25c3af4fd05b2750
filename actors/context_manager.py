"""ContextManager: the in-process API. Everything is a chunk; a named context says which
chunks the model sees; generation turns the prompt and the answer into chunks too."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvchunks.actors.chunk_store import ChunkStore
from kvchunks.common import (
    ChunkInUse,
    ConcurrentChange,
    ContextWindowExceeded,
    InvalidInput,
    KVSegment,
    slice_segments,
)
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.store.chunk import ChunkInfo, SourceSpan, check_tag
from kvchunks.store.kv_file import read_kv_file, write_kv_file
from kvchunks.store.registry import check_name
from kvchunks.vocabulary import DEFAULT_MODE, check_mode, check_recompute

# recompute None: realign's default fraction (modes.DEFAULT_RECOMPUTE).
DEFAULT_SETTINGS = {
    "mode": DEFAULT_MODE,
    "recompute": None,
    "auto_activate": False,
    "output_tokens": None,
}
ACTIVATE_ATTEMPTS = 5  # against other clients activating in the same context at once


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_chunk: ChunkInfo
    output_chunk: ChunkInfo | None
    output_chunks: list[ChunkInfo]
    finish_reason: str | None
    interrupted: bool = False
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    mode: str = DEFAULT_MODE  # the mode asked for (all agree when the context is one timeline)
    recompute: float | None = None  # realign's fraction as asked (None: the default)
    # Active-context tokens whose KV was used as stored (or derived by an earlier
    # generation), and those computed for this generation; the prompt is not counted.
    tokens_reused: int = 0
    tokens_recomputed: int = 0


@dataclass
class ContextView:
    name: str
    mode: str
    auto_activate: bool
    chunks: list[ChunkInfo]
    window: int
    recompute: float | None = None

    @property
    def token_count(self) -> int:
        return sum(c.token_count for c in self.chunks)


@dataclass
class OutputTracker:
    """Collects the output chunks of the generations inside `with cm.track_output()`."""

    manager: ContextManager
    chunks: list[ChunkInfo] = field(default_factory=list)

    def get_chunk(self) -> ChunkInfo | None:
        """The tracked output: one chunk, or a composed view when several were generated."""
        if len(self.chunks) <= 1:
            return self.chunks[0] if self.chunks else None
        return self.manager.compose_chunks([c.hash for c in self.chunks])


class OutputTracking:
    """`track_output()`, shared by ContextManager and the Ray Client."""

    _trackers: list[OutputTracker]

    @contextlib.contextmanager
    def track_output(self) -> Iterator[OutputTracker]:
        tracker = OutputTracker(self)  # type: ignore[arg-type]  # it needs compose_chunks
        self._trackers.append(tracker)
        try:
            yield tracker
        finally:
            self._trackers.remove(tracker)


class ContextManager(OutputTracking):
    """Chunks, one named activation set over them, and generation with that set."""

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
        self.context_name = check_name(context)
        self._owns_store = store is None
        self.store = store or ChunkStore(
            model, home=home, redis_url=redis_url, engine_config=engine_config
        )
        self.registry = self.store.registry
        self._trackers: list[OutputTracker] = []
        self.last_generation: GenerationResult | None = None
        if settings:
            self.configure(**settings)

    def close(self) -> None:
        """Free this manager's pool blocks (only if it made its own store)."""
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> ContextManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def with_context(self, context: str, **settings) -> ContextManager:
        """Another context over the same chunk pool."""
        return ContextManager(context=context, store=self.store, **settings)

    # -- settings ---------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        return {**DEFAULT_SETTINGS, **self.registry.settings(self.context_name)}

    def configure(self, **settings) -> dict:
        """Set context settings: mode (exact/reuse/realign), recompute (realign's fraction;
        a new mode without one clears it), auto_activate, output_tokens."""
        unknown = set(settings) - set(DEFAULT_SETTINGS)
        if unknown:
            raise InvalidInput(f"unknown setting(s) {', '.join(sorted(unknown))}")
        if "mode" in settings:
            check_mode(settings["mode"])
            settings.setdefault("recompute", None)
        if "recompute" in settings:
            mode = settings.get("mode", self.settings["mode"])
            check_recompute(mode, settings["recompute"])
        tokens = settings.get("output_tokens")
        if (
            tokens is not None
            and tokens != "manual"
            and not (isinstance(tokens, int) and tokens > 0)
        ):
            raise InvalidInput("output_tokens is None (per response), a positive int, or 'manual'")
        self.registry.update_settings(self.context_name, settings)
        return self.settings

    # -- chunks -----------------------------------------------------------------------------

    def add_chunk(
        self,
        text: str,
        role: str = "system",
        tags: list[str] | None = None,
        metadata: dict | None = None,
    ) -> ChunkInfo:
        """A standalone chunk of `text`, framed as a `role` turn; its KV is computed now."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("empty text: nothing to make a chunk of")
        tokens = self.store.chat.frame(role, text)
        self._check_fits(len(tokens))
        tags = [check_tag(t) for t in tags or []]
        meta = {"source": "text", **(metadata or {})}
        chunk = self.store.compute(
            tokens, [], "reuse", role=role, kind="input", text=text, metadata=meta
        )
        for tag in tags:
            chunk = self.registry.add_tag(chunk.hash, tag)
        return self._view(chunk.hash)

    def load_file(
        self,
        path: str | Path,
        role: str = "system",
        tags: list[str] | None = None,
        split_tokens: int | None = None,
    ) -> ChunkInfo | list[ChunkInfo]:
        """A chunk of a UTF-8 text file (or several of `split_tokens` tokens each)."""
        text = read_text_file(path)
        meta = {"source": str(Path(path).resolve())}
        if split_tokens is None:
            return self.add_chunk(text, role, tags, metadata=meta)
        if split_tokens < 1:
            raise InvalidInput("split_tokens must be a positive number of tokens")
        tok = self.store.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        parts = [tok.decode(ids[i : i + split_tokens]) for i in range(0, len(ids), split_tokens)]
        return [
            self.add_chunk(part, role, tags, metadata={**meta, "part": i, "parts": len(parts)})
            for i, part in enumerate(parts)
        ]

    def get_chunk(self, ref: str) -> ChunkInfo:
        return self.store.get(ref, self.context_name)

    def list_chunks(self, pattern: str | None = None, tag: str | None = None) -> list[ChunkInfo]:
        chunks = self.registry.list_chunks(pattern, tag, self.context_name)
        return self.store.describe_many(chunks)

    def provenance(self, ref: str) -> tuple[list[ChunkInfo], list[ChunkInfo]]:
        """The chunk's parents (what it was computed after, in order) and its children."""
        chunk_hash = self.registry.resolve(ref)
        parents = self.registry.get_many(self.registry.parents(chunk_hash), self.context_name)
        children = self.registry.get_many(self.registry.children(chunk_hash), self.context_name)
        described = self.store.describe_many([*parents, *children])
        return described[: len(parents)], described[len(parents) :]

    def stats(self) -> dict:
        """Pool usage, chunks per tier, the store's counters and the last generation's speed."""
        chunks = self.list_chunks()
        pool = None
        if self.store.engine_started:
            bm = self.store.llm.block_manager
            pool = {"blocks": bm.num_blocks, "free": bm.num_free, "block_size": bm.block_size}
        last = self.last_generation
        return {
            "pool": pool,
            "tiers": dict(Counter(c.tier for c in chunks)),
            "active": sum(c.is_active for c in chunks),
            "counters": dict(self.store.stats),
            "last_generation": None
            if last is None
            else {
                "tokens": len(last.token_ids),
                "ttft_s": last.ttft_s,
                "tokens_per_s": last.tokens_per_s,
                "interrupted": last.interrupted,
            },
        }

    def tag_chunk(self, ref: str, tag: str) -> ChunkInfo:
        self.registry.add_tag(self.registry.resolve(ref), check_tag(tag))
        return self.get_chunk(ref)

    def untag_chunk(self, ref: str, tag: str) -> ChunkInfo:
        self.registry.remove_tag(self.registry.resolve(ref), tag)
        return self.get_chunk(ref)

    def delete_chunk(self, ref: str, cascade: bool = False) -> list[str]:
        """Delete a chunk for good; views over it are refused unless cascade. Returns hashes."""
        chunk = self.registry.find(ref)
        views = self._views_over(chunk.hash)
        if views and not cascade:
            shown = ", ".join(v[:12] for v in views)
            raise ChunkInUse(
                f"chunk {chunk.hash[:12]} is used by view(s) {shown}; delete them first "
                "or delete with cascade"
            )
        deleted = []
        for view in views:
            deleted += self.delete_chunk(view, cascade=True)
        self.store.delete(chunk)
        return [*deleted, chunk.hash]

    def _views_over(self, chunk_hash: str) -> list[str]:
        children = self.registry.get_many(self.registry.children(chunk_hash))
        return [c.hash for c in children if c.layout == "view"]

    def compose_chunks(self, refs: list[str], tags: list[str] | None = None) -> ChunkInfo:
        """One chunk that reads the given chunks' KV in order (a view: nothing is copied)."""
        if len(refs) < 2:
            raise InvalidInput("compose needs at least two chunks")
        chunks = [self.registry.find(r) for r in refs]
        spans = [s for c in chunks for s in _spans(c)]
        view = self.store.make_view("composed", spans, tags=[check_tag(t) for t in tags or []])
        return self._view(view.hash)

    def split_chunk(self, ref: str, at: int) -> tuple[ChunkInfo, ChunkInfo]:
        """Two views of the chunk, split before token `at`."""
        chunk = self.registry.find(ref)
        if not isinstance(at, int) or not 0 < at < chunk.token_count:
            raise InvalidInput(f"split point must be between 1 and {chunk.token_count - 1}")
        spans = _spans(chunk)
        head = self.store.make_view("split", _cut(spans, 0, at))
        tail = self.store.make_view("split", _cut(spans, at, chunk.token_count))
        return self._view(head.hash), self._view(tail.hash)

    def populate(self, ref: str) -> ChunkInfo:
        """Bring the chunk's KV into the pool now (from its file, or recomputed)."""
        return self.move_to_gpu(ref)

    # -- tiers ------------------------------------------------------------------------------

    def move_to_gpu(self, ref: str) -> ChunkInfo:
        """Put the chunk's KV in the engine's pool (a view: its sources')."""
        chunk = self.registry.find(ref, self.context_name)
        self.store.move_to_gpu(chunk)
        return self.store.describe(chunk)

    def move_to_cpu(self, ref: str) -> ChunkInfo:
        """Keep the chunk's KV in host memory, freeing its pool blocks."""
        chunk = self.registry.find(ref, self.context_name)
        self.store.move_to_cpu(chunk)
        return self.store.describe(chunk)

    def archive_to_disk(self, ref: str) -> ChunkInfo:
        """Keep the chunk's KV only in its file, freeing pool blocks and host memory."""
        chunk = self.registry.find(ref, self.context_name)
        self.store.archive_to_disk(chunk)
        return self.store.describe(chunk)

    def prefetch(self, ref: str) -> ChunkInfo:
        """Start bringing the chunk's KV into the pool in the background."""
        chunk_hash = self.registry.resolve(ref)
        self.store.prefetch(chunk_hash)
        return self._view(chunk_hash)

    # -- activation -------------------------------------------------------------------------

    def activate_chunk(self, ref: str) -> ChunkInfo:
        """Let the model see this chunk, after the chunks already active (no KV is copied)."""
        chunk, active = self.registry.find_with_active(ref, self.context_name)
        for attempt in range(ACTIVATE_ATTEMPTS):
            if attempt:  # someone changed the active chunks since they were read
                active = self.registry.active(self.context_name)
            if chunk.hash in active:
                break
            self._check_window_after(active, chunk.hash)
            try:  # the window check holds only if nobody activated something meanwhile
                self.registry.activate(self.context_name, chunk.hash, expected=active)
                break
            except ConcurrentChange:
                if attempt == ACTIVATE_ATTEMPTS - 1:
                    raise
        chunk.is_active = True
        chunk = self.store.describe(chunk)
        self.store.on_activate(chunk, active)
        return chunk

    def _check_window_after(self, active: list[str], chunk_hash: str) -> None:
        total = self.store.token_count([*active, chunk_hash])
        if total > self.store.window:
            adding = self.store.token_count([chunk_hash])
            raise ContextWindowExceeded(
                f"activating {chunk_hash[:12]} ({adding} tokens) would make {total} "
                f"active tokens, over the context window of {self.store.window}; "
                "deactivate something first"
            )

    def deactivate_chunk(self, ref: str) -> ChunkInfo:
        return self.store.describe(self.registry.find_and_deactivate(ref, self.context_name))

    def context(self) -> ContextView:
        s = self.settings
        chunks = self.registry.get_many(self.registry.active(self.context_name), self.context_name)
        chunks = self.store.describe_many(chunks)
        return ContextView(
            self.context_name,
            s["mode"],
            s["auto_activate"],
            chunks,
            self.store.window,
            s["recompute"],
        )

    def clear(self) -> None:
        """Deactivate every chunk of this context (nothing is deleted)."""
        self.registry.clear_context(self.context_name)

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        mode: str | None = None,
        on_text: Callable[[str], None] | None = None,
        recompute: float | None = None,
    ) -> GenerationResult:
        """Answer `prompt` attending to the active chunks; the prompt and the answer become
        chunks whose parents are the active chunks (and, for the answer, the prompt).

        mode and recompute default to the context's settings; recompute (realign only) is
        the fraction of the composed chunks' tokens whose KV is computed again in order."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput("empty prompt")
        params = params or SamplingParams(temperature=0, max_tokens=256)
        settings = self.settings
        mode = mode or settings["mode"]
        if mode == settings["mode"]:  # the context's fraction goes with the context's mode
            recompute = _first(recompute, settings["recompute"])
        check_recompute(check_mode(mode), recompute)
        active = self.registry.get_many(self.registry.active(self.context_name))
        prompt_tokens = self.store.chat.prompt(prompt)
        context_tokens = sum(c.token_count for c in active)
        self._check_fits(context_tokens + len(prompt_tokens) + params.max_tokens)
        store = self.store
        store.llm  # noqa: B018  (starts the engine on first use: not part of the first token)
        started = time.perf_counter()
        with contextlib.ExitStack() as pins:
            # Nothing this generation reads may be evicted meanwhile: the active chunks, and a
            # stored prompt it continues from.
            pins.enter_context(store.pinning(active))
            with store.lock:
                ctx = store.context_of(active, mode, recompute)
            try:
                record = store.new_record(
                    prompt_tokens,
                    active,
                    ctx.position,
                    ctx.combine,
                    mode,
                    role="user",
                    kind="input",
                    text=prompt,
                    metadata={"source": "prompt", "context": self.context_name},
                )
                pins.enter_context(store.pinning([record]))
                with store.lock:
                    seq, fresh = self._start(record, ctx, params)
                skip = len(prompt_tokens) if fresh else 1
                answer, ttft, interrupted = self._run(seq, on_text, started, skip)
                elapsed = time.perf_counter() - started
                with store.lock:
                    prompt_chunk, prompt_kv = self._store_prompt(record, seq, fresh)
                    outputs = self._store_answer(
                        seq,
                        skip,
                        [*active, prompt_chunk],
                        [*ctx.segments, *prompt_kv],
                        ctx.position + len(prompt_tokens),
                        ctx.combine,
                        mode,
                        params,
                        interrupted,
                    )
            finally:
                store.release(ctx)
        result = GenerationResult(
            text=store.decode(answer),
            token_ids=answer,
            prompt_chunk=self._view(prompt_chunk.hash),
            output_chunk=outputs[-1] if outputs else None,
            output_chunks=outputs,
            finish_reason=seq.finish_reason,
            interrupted=interrupted,
            ttft_s=ttft,
            tokens_per_s=(len(answer) - 1) / max(elapsed - ttft, 1e-9) if answer else 0.0,
            mode=mode,
            recompute=recompute,
            tokens_reused=ctx.reused,
            tokens_recomputed=ctx.recomputed,
        )
        if settings["auto_activate"]:
            for chunk in [prompt_chunk, *outputs]:
                self.activate_chunk(chunk.hash)
        for tracker in self._trackers:
            tracker.chunks += outputs
        self.last_generation = result
        return result

    def _start(self, record: ChunkInfo, ctx, params: SamplingParams):
        """Queue the answer: a new prompt is computed in the answer's own sequence, so its
        last logits give the first answer token; a stored prompt is reused and only its last
        token is computed again. Returns the sequence and whether the prompt is new."""
        store, llm = self.store, self.store.llm
        # The whole answer's blocks are taken now (reserve): background prefetches and other
        # contexts allocate from the same pool between this request's steps.
        if not self.registry.exists(record.hash):
            store.make_room(
                llm.block_manager.blocks_to_follow(None, record.token_count + params.max_tokens)
            )
            seq = llm.add_request(
                record.token_ids, params, ctx.segments, ctx.position, True, reserve=True
            )
            return seq, True
        prompt_kv = store.segments(store.get(record.hash))
        head = slice_segments(prompt_kv, 0, record.token_count - 1, store.block_size)
        store.make_room(llm.block_manager.blocks_to_follow(prompt_kv[-1], 1 + params.max_tokens))
        seq = llm.add_request(
            record.token_ids[-1:],
            params,
            [*ctx.segments, *head],
            ctx.position + record.token_count - 1,
            True,
            continue_after=prompt_kv[-1],
            reserve=True,
        )
        return seq, False

    def _store_prompt(self, record: ChunkInfo, seq, fresh: bool):
        """The prompt chunk and its KV (from the answer's sequence when it was new). If it
        cannot be stored, the sequence's KV is let go."""
        store = self.store
        try:
            if fresh:
                own = seq.own_segment()
                if own.length < record.token_count:  # interrupted before the prompt was read
                    raise KeyboardInterrupt
                part = own.sub(0, record.token_count, store.block_size)
                store.llm.retain(part)
                store.register(record, [part])
            chunk = store.get(record.hash)
            return chunk, store.segments(chunk)
        except BaseException:
            store.llm.release(seq.own_segment())
            raise

    def _run(self, seq, on_text, started: float, skip: int) -> tuple[list[int], float, bool]:
        """Drive the engine until the answer is done; Ctrl-C keeps what was computed."""
        llm, ttft, shown = self.store.llm, 0.0, ""
        try:
            for _ in llm.stream(seq, self.store.lock):
                ttft = ttft or time.perf_counter() - started
                if on_text:
                    text = llm.decode(seq.completion_token_ids)
                    if len(text) > len(shown):
                        on_text(text[len(shown) :])
                        shown = text
        except KeyboardInterrupt:
            with self.store.lock:
                llm.abort(seq)
            return seq.completion_token_ids[: max(seq.num_computed - skip, 0)], ttft, True
        return seq.completion_token_ids, ttft, False

    def _store_answer(
        self,
        seq,
        skip: int,
        parents: list[ChunkInfo],
        context: list[KVSegment],
        position: int,
        combine: str,
        mode: str,
        params: SamplingParams,
        interrupted: bool,
    ) -> list[ChunkInfo]:
        """Turn the answer's KV into output chunk(s), closed the way the chat template closes
        an assistant turn. The sequence's first `skip` own tokens are the prompt's."""
        llm, store = self.store.llm, self.store
        own = seq.own_segment()
        answer = seq.completion_token_ids[: max(own.length - skip, 0)]
        granularity = self.settings["output_tokens"]
        kv = [own.sub(skip, len(answer), store.block_size)]
        outputs: list[ChunkInfo] = []
        try:  # each output stored takes its own references; the sequence's are let go after
            if not answer or (granularity == "manual" and not self._trackers):
                return []
            closing = [] if interrupted else store.chat.close_answer(answer)
            if closing:
                store.make_room(llm.block_manager.blocks_to_follow(own, len(closing)))
                kv.append(
                    llm.prefill(
                        closing, [*context, kv[0]], position + len(answer), continue_after=own
                    ).segment
                )
            tokens = answer + closing
            size = granularity if isinstance(granularity, int) else len(tokens)
            generation = {**params.to_dict(), "mode": mode}
            meta = {
                "source": "generation",
                "context": self.context_name,
                "interrupted": interrupted,
            }
            for start in range(0, len(tokens), size):
                part = slice_segments(kv, start, min(size, len(tokens) - start), store.block_size)
                for seg in part:
                    llm.retain(seg)
                record = store.new_record(
                    tokens[start : start + size],
                    [*parents, *outputs],
                    position + start,
                    combine,
                    mode,
                    role="assistant",
                    kind="output",
                    generation_params=generation,
                    metadata=meta,
                    text=llm.decode(tokens[start : start + size]),
                )
                outputs.append(store.register(record, part))
        finally:
            llm.release(own)
            store.free(kv[1:])
        return [self._view(c.hash) for c in outputs]

    # -- files ------------------------------------------------------------------------------

    def export_chunk(self, ref: str, path: str | Path, force: bool = False) -> Path:
        """Write one chunk (tokens, record and KV) to a file another data directory can import.

        A relative path lands in `<home>/exports`; it may not climb out of it.
        """
        chunk = self.registry.find(ref)
        if chunk.layout == "view":
            raise InvalidInput("a view has no KV of its own: export the chunks it reads")
        target = self._export_path(path)
        if target.exists() and not force:
            raise InvalidInput(f"{target} exists; pass force to overwrite it")
        k, v = self.store.read_kv(self.store.ensure_resident(chunk))
        record = chunk.to_record() | {"segments": [], "is_active": False}
        write_kv_file(target, k, v, record, self.store.fingerprint)
        return target

    def _export_path(self, path: str | Path) -> Path:
        base = (self.store.home / "exports").resolve()
        given = Path(path).expanduser()
        target = given if given.is_absolute() else (base / given).resolve()
        if not given.is_absolute() and base not in target.parents:
            raise InvalidInput(f"{path} leaves the exports directory {base}; give an absolute path")
        if not target.parent.is_dir():
            if given.is_absolute():
                raise InvalidInput(f"directory {target.parent} does not exist")
            target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def import_chunk(self, path: str | Path) -> ChunkInfo:
        """Add a chunk exported from a data directory of the same model, dtype and shapes."""
        file = Path(path).expanduser()
        if not file.is_absolute() and not file.exists():
            file = self.store.home / "exports" / file
        c = self.store.model_config
        shape = (c.num_layers, None, c.num_kv_heads, c.head_dim)
        k, v, record, _ = read_kv_file(
            file, self.store.fingerprint, self.store.engine_config.dtype, shape
        )
        chunk = ChunkInfo.from_record(record)
        if chunk.layout == "view" or k.shape[1] != chunk.token_count:
            raise InvalidInput(f"{file} does not hold a chunk's own KV")
        if not self.registry.exists(chunk.hash):
            with self.store.lock:
                self.store.register(chunk, [self.store.write_pool(k, v, chunk.position)])
        return self.get_chunk(chunk.hash)

    # -- helpers ----------------------------------------------------------------------------

    def _view(self, chunk_hash: str) -> ChunkInfo:
        return self.store.describe(self.registry.get(chunk_hash, self.context_name))

    def _check_fits(self, tokens: int) -> None:
        if tokens > self.store.window:
            raise ContextWindowExceeded(
                f"{tokens} tokens exceed the context window of {self.store.window}; deactivate "
                "chunks, lower max_tokens, or split the text"
            )


def read_text_file(path: str | Path) -> str:
    """A file's text, refusing what is missing, empty, binary or not UTF-8."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidInput(f"no such file: {file}")
    data = file.read_bytes()
    if not data.strip():
        raise InvalidInput(f"{file} is empty")
    if b"\x00" in data[:8192]:
        raise InvalidInput(f"{file} looks binary; load text files only")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{file} is not UTF-8 text (byte {e.start}); convert it first") from e


def _first(*values):
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def _spans(chunk: ChunkInfo) -> list[SourceSpan]:
    return (
        chunk.sources if chunk.layout == "view" else [SourceSpan(chunk.hash, 0, chunk.token_count)]
    )


def _cut(spans: list[SourceSpan], start: int, end: int) -> list[SourceSpan]:
    out, offset = [], 0
    for s in spans:
        lo, hi = max(start, offset), min(end, offset + s.length)
        if lo < hi:
            out.append(SourceSpan(s.hash, s.offset + lo - offset, hi - lo))
        offset += s.length
    return out
