"""Catalog: the chunks and one named context, read and changed in the registry alone.

Listing, lookup, provenance, tags, the active list with its window check and the context's
settings need no engine and no pool. `open_catalog` serves them without importing torch or
transformers, so a one-shot `kvchunks list` answers at once. ContextManager is a Catalog that
also computes KV; it passes in what only it has: views that know its pool, and the prefetch an
activation starts. Without those, a chunk's tier is the one the registry recorded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from kvchunks.common import ConcurrentChange, ContextWindowExceeded, InvalidInput
from kvchunks.engine.checkpoint import (
    context_window,
    default_model_dir,
    default_model_window,
    read_config,
    resolve_model,
)
from kvchunks.service.context_settings import DEFAULT_SETTINGS, ContextView, checked_settings
from kvchunks.service.pieces import Records, owner_hashes
from kvchunks.store.chunk import ChunkInfo, check_dtype
from kvchunks.store.redis_server import close as close_redis
from kvchunks.store.redis_server import connect
from kvchunks.store.registry import ChunkRegistry
from kvchunks.vocabulary import DEFAULT_DTYPE, check_name, check_tag, checked_refs, farthest_tier

# Against other clients activating in the same context at once: each round one of them
# gets in, and the others try again after a random wait (together, they would collide again).
ACTIVATE_ATTEMPTS = 32
ACTIVATE_BACKOFF_S = 0.001

# Records as callers see them: each chunk's view with its tier (and pool segments, with a pool).
Describe = Callable[[list[ChunkInfo]], list[ChunkInfo]]
# Told of each activation: the activated chunk and the chunks active before it.
OnActivate = Callable[[ChunkInfo, list[str]], None]


class Catalog:
    """Chunks, their provenance and tags, and one named activation set over them."""

    def __init__(
        self,
        registry: ChunkRegistry,
        context: str = "default",
        *,
        window: Callable[[], int],  # the model's context window, asked when a check needs it
        opening: Callable[[], int],  # the length of the model's opening, which precedes them
        describe: Describe | None = None,
        on_activate: OnActivate | None = None,
        dtype: str = DEFAULT_DTYPE,  # of the model: chunks of another are never activated
        connection: redis.Redis | None = None,  # closed by close(): the catalog opened it
    ):
        self.context_name = check_name(context)
        self.registry = registry
        self._window, self._opening = window, opening
        self._describe = describe or self._recorded_views
        self._on_activate = on_activate
        self._dtype = dtype
        self._connection = connection
        self._token_counts: dict[str, int] = {}  # a hash's count never changes

    def close(self) -> None:
        """Disconnect from Redis, if the catalog connected itself."""
        if self._connection is not None:
            close_redis(self._connection)
            self._connection = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- settings ---------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        return {**DEFAULT_SETTINGS, **self.registry.settings(self.context_name)}

    def configure(self, **settings) -> dict:
        """Set context settings: mode (exact/reuse/realign), recompute (realign's fraction;
        a new mode without one clears it), auto_activate, output_tokens. None sets one's
        default."""
        settings = checked_settings(settings, self.settings["mode"])
        self.registry.update_settings(self.context_name, settings)
        return self.settings

    # -- chunks -----------------------------------------------------------------------------

    def get_chunk(self, ref: str) -> ChunkInfo:
        return self._describe([self.registry.find(ref, self.context_name)])[0]

    def list_chunks(self, pattern: str | None = None, tag: str | None = None) -> list[ChunkInfo]:
        with collector_paused():
            return self._describe(self.registry.list_chunks(pattern, tag, self.context_name))

    def same_text(self, ref: str) -> list[ChunkInfo]:
        """The other chunks with this chunk's tokens (its content hash), computed after other
        chunks than it was: the same question asked over other documents, the same passage
        read after others. Oldest first."""
        chunk = self.registry.find(ref, self.context_name)
        others = [h for h in self.registry.by_content(chunk.content_hash) if h != chunk.hash]
        found = self.registry.get_present(others, self.context_name)
        return self._describe(sorted(found, key=lambda c: (c.created_at, c.hash)))

    def provenance(self, ref: str) -> tuple[list[ChunkInfo], list[ChunkInfo]]:
        """The chunk's parents (what it was computed after, in order) and its children."""
        chunk_hash = self.registry.resolve(ref)
        parents = self.registry.get_many(self.registry.parents(chunk_hash), self.context_name)
        children = self.registry.get_many(self.registry.children(chunk_hash), self.context_name)
        described = self._describe([*parents, *children])
        return described[: len(parents)], described[len(parents) :]

    def tag_chunk(self, ref: str, tag: str) -> ChunkInfo:
        self.registry.add_tag(self.registry.resolve(ref), check_tag(tag))
        return self.get_chunk(ref)

    def untag_chunk(self, ref: str, tag: str) -> ChunkInfo:
        self.registry.remove_tag(self.registry.resolve(ref), tag)
        return self.get_chunk(ref)

    # -- activation -------------------------------------------------------------------------

    def activate_chunk(self, ref: str) -> ChunkInfo:
        """Let the model see this chunk, after the chunks already active (no KV is copied)."""
        return self.activate_chunks([ref])[0]

    def activate_chunks(self, refs: list[str]) -> list[ChunkInfo]:
        """activate_chunk of several chunks, in order, all or none: if one cannot be (not
        found, of another dtype, over the window with the others), none is. A chunk already
        active stays where it is; one named twice is activated once."""
        refs = checked_refs(refs)
        if not refs:
            return []
        chunks, active = self.registry.find_many_with_active(refs, self.context_name)
        chunks = list({c.hash: c for c in chunks}.values())
        check_dtype(chunks, self._dtype)
        self._token_counts.update((c.hash, c.token_count) for c in chunks)
        hashes = [c.hash for c in chunks]
        for attempt in range(ACTIVATE_ATTEMPTS):
            if attempt:  # someone changed the active chunks since they were read
                time.sleep(random.uniform(0, ACTIVATE_BACKOFF_S * attempt))
                active = self.registry.active(self.context_name)
            new = [h for h in hashes if h not in active]
            if not new:
                break
            self._check_window_after(active, new)
            try:  # the window check holds only if nobody activated something meanwhile
                self.registry.activate_many(self.context_name, new, expected=active)
                break
            except ConcurrentChange:
                if attempt == ACTIVATE_ATTEMPTS - 1:
                    raise
        views = self._describe([ChunkInfo.view(c, c.tier, is_active=True) for c in chunks])
        # Only new activations: a policy learning from co-activations would count one again.
        if self._on_activate is not None:
            before = list(active)
            for view in views:
                if view.hash in new:
                    self._on_activate(view, list(before))
                    before.append(view.hash)
        return views

    def _check_window_after(self, active: list[str], new: list[str]) -> None:
        total = self._token_count([*active, *new])
        window, opening = self._window(), self._opening()
        if total > window - opening:
            adding = self._token_count(new)
            what = new[0][:12] if len(new) == 1 else f"{len(new)} chunks"
            first = freeing(self.registry.get_many(active), total - (window - opening))
            raise ContextWindowExceeded(
                f"activating {what} ({adding} tokens) would make {total} active tokens, over "
                f"the context window of {window} after the model's {opening}-token opening; "
                f"{'' if len(new) == 1 else 'activate fewer, or '}deactivate something "
                f"first{first}"
            )

    def deactivate_chunk(self, ref: str) -> ChunkInfo:
        """Hide this chunk from the model (it stays stored)."""
        return self.deactivate_chunks([ref])[0]

    def deactivate_chunks(self, refs: list[str]) -> list[ChunkInfo]:
        """deactivate_chunk of several chunks (each once), all or none: every one is found
        before any is hidden. One that was not active stays so."""
        refs = checked_refs(refs)
        if not refs:
            return []
        return self._describe(self.registry.find_and_deactivate_many(refs, self.context_name))

    def reorder_chunks(self, refs: list[str]) -> ContextView:
        """Lay the active chunks out in this order, which lists each of them once. No KV is
        copied: the next generation composes them in the new order."""
        order = [self.registry.resolve(ref) for ref in checked_refs(refs)]
        active = self.registry.active(self.context_name)
        if sorted(order) != sorted(active):
            raise InvalidInput("the new order must list every active chunk of the context once")
        self.registry.reorder(self.context_name, order, expected=active)
        return self.context()

    def context(self) -> ContextView:
        s = self.settings
        chunks = self.registry.get_many(self.registry.active(self.context_name), self.context_name)
        return ContextView(
            self.context_name,
            s["mode"],
            s["auto_activate"],
            self._describe(chunks),
            self._window(),
            s["recompute"],
            s["output_tokens"],
        )

    def clear(self) -> None:
        """Deactivate every chunk of this context (nothing is deleted)."""
        self.registry.clear_context(self.context_name)

    def delete_context(self) -> None:
        """Forget this context: its active list, its settings and its name. No chunk is
        deleted; using the context again starts it anew, with the default settings."""
        self.registry.delete_context(self.context_name)

    # -- helpers ----------------------------------------------------------------------------

    def _view(self, chunk_hash: str) -> ChunkInfo:
        return self._describe([self.registry.get(chunk_hash, self.context_name)])[0]

    def _token_count(self, hashes: list[str]) -> int:
        """Total tokens of these chunks (read once per hash: counts never change)."""
        missing = [h for h in hashes if h not in self._token_counts]
        for chunk in self.registry.get_many(missing):
            self._token_counts[chunk.hash] = chunk.token_count
        return sum(self._token_counts[h] for h in hashes)

    def _recorded_views(self, chunks: list[ChunkInfo]) -> list[ChunkInfo]:
        tiers = recorded_tiers(self.registry, chunks)
        return [ChunkInfo.view(c, t, c.is_active) for c, t in zip(chunks, tiers, strict=True)]


def recorded_tiers(
    records: Records, chunks: list[ChunkInfo], latest: Callable[[str], str | None] | None = None
) -> list[str]:
    """Each chunk's tier where no pool says otherwise: the tier recorded (by this process
    first, `latest`, then in the registry); a view's is its furthest source's. Sources not
    among `chunks` are read in one round trip."""
    known = {c.hash: c for c in chunks}
    wanted = list(dict.fromkeys(h for c in chunks for h in owner_hashes(c)))
    if missing := [h for h in wanted if h not in known]:
        known |= {c.hash: c for c in records.get_many(missing)}
    recorded = latest or _nothing_recorded
    return [
        farthest_tier([recorded(h) or known[h].tier for h in owner_hashes(chunk)])
        for chunk in chunks
    ]


def _nothing_recorded(chunk_hash: str) -> None:
    return None


def open_catalog(
    model: str | Path | None = None,
    *,
    context: str = "default",
    home: str | Path | None = None,
    redis_url: str | None = None,
    dtype: str | None = None,
) -> Catalog:
    """A Catalog over the registry of a data directory (or the Redis at `redis_url`).

    `model` (a checkpoint folder; default: the default model) is looked for only when the
    context window is first needed, and only its config.json is read (the default model's
    GGUF header if it is not prepared yet): listing never needs the model, and nothing here
    converts it. `dtype` is the one the model would run in (default float32): chunks
    computed in another are not activated.
    """
    client = connect(Path(home) if home is not None else None, redis_url)
    if model is None:
        window = functools.cache(default_model_window)
    else:
        window = functools.cache(lambda: context_window(read_config(resolve_model(model))))
    registry = ChunkRegistry(client)
    folder = str((default_model_dir() if model is None else Path(model).expanduser()).resolve())
    dtype = dtype or DEFAULT_DTYPE
    return Catalog(
        registry,
        context,
        window=window,
        opening=lambda: registry.opening(folder),
        dtype=dtype,
        connection=client,
    )


def check_fits(tokens: int, window: int, opening: int, remedy: str | list[ChunkInfo]) -> None:
    """Refuse `tokens` that do not fit the window after the model's opening (every context
    starts with it). `remedy` says what to do, or is a generation's active chunks: then
    deactivate some (the first that make room are named) or lower max_tokens, or where even
    deactivating them all would not make room, shorten the prompt."""
    over = opening + tokens - window
    if over > 0:
        if isinstance(remedy, list):  # deactivating them all may not be enough
            first = freeing(remedy, over)
            remedy = (
                f"deactivate chunks{first} or lower max_tokens"
                if first
                else "shorten the prompt or lower max_tokens"
            )
        raise ContextWindowExceeded(
            f"{tokens} tokens (after the model's {opening}-token opening) exceed the "
            f"context window of {window} by {over}; {remedy}"
        )


def freeing(active: list[ChunkInfo], needed: int) -> str:
    """For a refusal's remedy: the fewest active chunks, first in the layout (a
    conversation's oldest turns), whose deactivation frees `needed` tokens; empty if all of
    them would not."""
    named, freed = [], 0
    for chunk in active:
        if freed >= needed:
            break
        named.append(chunk.hash[:12])
        freed += chunk.token_count
    if freed < needed:
        return ""
    listed = ", ".join(named[:4]) + (f" and {len(named) - 4} more" if len(named) > 4 else "")
    return f" (the first {len(named)} active, {listed}, free {freed} tokens)"


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a listing builds its records and views:
    each makes new lists and dicts, which set off full collections over everything alive,
    so a listing's cost per chunk grew with the number of chunks. Records make no cycles.
    The collector is left off if something else had turned it off."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
