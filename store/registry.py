"""ChunkRegistry: chunk records, tags, provenance and contexts, kept in Redis.

Key layout; every key starts with `<namespace>:` so several registries can share a server.

    chunk:<h>            string  msgpack chunk record (ChunkRecord.to_record)
    tiers                hash    chunk hash -> the tier its KV was last recorded in
    hashes               zset    every chunk hash, all at score 0, so ZRANGEBYLEX finds prefixes
    content:<c>          set     hashes of the chunks whose token ids have content hash <c>
    tag:<t>              set     hashes of the chunks tagged <t> (each record lists its tags)
    parents:<h>          list    <h>'s parents, in order, that are still in the registry
    children:<h>         set     chunks that have <h> among their parents
    contexts             set     names of the contexts ever written
    ctx:<name>:active    list    the context's active chunk hashes; activation order = layout
    ctx:<name>:settings  hash    setting name -> msgpack value (mode, auto_activate, ...)
    hold:<h>             hash    id of each running call that holds <h> -> 1 (see hold)
    kept:<h>             string  set while held: a holder stored <h> as its own
    unwanted:<h>         string  <h> was taken back while held, or made by a call that holds it
                                 and has not stored it as its own: it goes once its last hold does
    lease:<store>        string  set, with an expiry, while the store's process lives (renew_lease)
    holding              set     names of the stores whose calls have held chunks (see hold)

Every method takes full hashes; `resolve` turns a user's short prefix into one. Writes that
touch several keys run in one MULTI/EXEC under WATCH, so a record and its index entries never
disagree. Durability is the server's: the embedded server syncs its AOF before it replies.

Provenance edges exist only between chunks in the registry: deleting a chunk removes it from
its children's `parents` and its parents' `children`. The chunk record's `parent_chunks`
keeps the list as computed, since the chunk's hash was derived from it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import msgpack
import redis

from kvchunks.common import (
    AmbiguousHash,
    ChunkInUse,
    ChunkNotFound,
    ConcurrentChange,
    InvalidInput,
    RegistryUnavailable,
)
from kvchunks.store.chunk import ChunkInfo, ChunkRecord, is_hash, pack_record, unpack_record
from kvchunks.vocabulary import TIERS, check_name, check_tag

MIN_PREFIX = 4
# Fields a chunk may change after it is stored. The rest either define its hash (tokens,
# position, parents), change with the views that read the chunk (ref_count: put and delete
# of a view) or never change (created_at). A view's tier (set_tiers) and activity (contexts)
# are not in the record.
UPDATABLE = frozenset(
    [
        "metadata",
        "text",
        "role",
        "kind",
        "layout",
        "sources",
        "tags",
        "generation_params",
    ]
)
_HEX = re.compile(r"[0-9a-f]+")
_BATCH = 512

P = ParamSpec("P")
R = TypeVar("R")


def _redis_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Turn a failing Redis (down, refusing writes, out of memory) into RegistryUnavailable."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise RegistryUnavailable(f"the chunk registry's Redis failed: {detail}") from e

    return wrapper


# The chunks (records KEYS[3..], hashes ARGV[3..]) not yet in the active list KEYS[1] are
# appended in order, all or none. With ARGV[2] = "=<comma-joined hashes>" the list must
# still be what the caller checked, so a check made on it (the context window) holds when
# they are added. Returns {added, ""}, {-1, missing hash} or {-2, ""}.
_ACTIVATE = """
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1, ARGV[i]} end
end
if ARGV[2] ~= '' and '=' .. table.concat(redis.call('LRANGE', KEYS[1], 0, -1), ',') ~= ARGV[2]
then
  return {-2, ''}
end
local added = 0
for i = 3, #ARGV do
  if not redis.call('LPOS', KEYS[1], ARGV[i]) then
    redis.call('RPUSH', KEYS[1], ARGV[i])
    added = added + 1
  end
end
if added > 0 then redis.call('SADD', KEYS[2], ARGV[1]) end
return {added, ''}
"""


# The chunks (records KEYS[3..], hashes ARGV) leave the active list KEYS[1], all or none: each
# record and its tier (from the hash KEYS[2], '' if never recorded) is read first, and a
# missing one changes nothing. Returns {0, {record, tier, ...}} or {-1, missing hash}.
_DEACTIVATE = """
local found = {}
for i = 3, #KEYS do
  local record = redis.call('GET', KEYS[i])
  if not record then return {-1, ARGV[i - 2]} end
  found[#found + 1] = record
  found[#found + 1] = redis.call('HGET', KEYS[2], ARGV[i - 2]) or ''
end
for i = 1, #ARGV do redis.call('LREM', KEYS[1], 0, ARGV[i]) end
return {0, found}
"""


# A new layout order of the same active chunks, only if the list is still what the caller
# checked it against (comma-joined in ARGV[1]): the chunks in ARGV[2..], in their order.
_REORDER = """
if table.concat(redis.call('LRANGE', KEYS[1], 0, -1), ',') ~= ARGV[1] then return -2 end
redis.call('DEL', KEYS[1])
if #ARGV > 1 then redis.call('RPUSH', KEYS[1], unpack(ARGV, 2)) end
return 1
"""


# A chunk's tier changes often and is one short field: it lives in its own hash, not in the
# record, so a move costs one small write.
_SET_TIER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


# A call lets go of its holds, in order (KEYS: hold, kept and unwanted key of each chunk;
# ARGV[1]: the call's id; ARGV[i+1]: '1' where the call stored the i-th chunk as its own), up
# to the first chunk taken back while held that no call holds any more: returns its
# (1-based) index, or 0 once all are let go. Its mark stays until the caller's take-back, so
# that a keeper coming in between wins. Running it twice (a command resent) changes nothing
# more.
_LET_GO = """
for i = 1, #KEYS / 3 do
  local held, kept, unwanted = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  redis.call('HDEL', held, ARGV[1])
  local others = redis.call('EXISTS', held) == 1
  if ARGV[i + 1] == '1' then
    redis.call('DEL', unwanted)
    if others then redis.call('SET', kept, '1') end
  end
  if not others then
    redis.call('DEL', kept)
    if redis.call('EXISTS', unwanted) == 1 then return i end
  end
end
return 0
"""


def _store_of(holder: str) -> str:
    """The store whose call a hold's id names (`<store>:<call>`)."""
    return holder.split(":")[0]


class ChunkRegistry:
    """Chunk metadata, tags, provenance graph and contexts over one Redis client."""

    def __init__(self, client: redis.Redis, namespace: str = "kvchunks"):
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise InvalidInput("the registry needs a Redis client with decode_responses=False")
        self._redis = client
        self.namespace = check_name(namespace, "namespace")
        self._activate_script = client.register_script(_ACTIVATE)
        self._set_tier_script = client.register_script(_SET_TIER)
        self._reorder_script = client.register_script(_REORDER)
        self._deactivate_script = client.register_script(_DEACTIVATE)
        self._let_go_script = client.register_script(_LET_GO)
        self._parsed = ParsedRecords()

    # -- chunks ------------------------------------------------------------------------

    @_redis_errors
    def put(self, chunk: ChunkRecord, tier: str | None = None, made_by_call: bool = False) -> bool:
        """Store a new chunk with its index entries, provenance edges and, if given, the tier
        its KV is in, atomically; a view counts as one more reference of each chunk it reads
        (ChunkNotFound if one is gone). `made_by_call`: a running call that holds the chunk
        made it, and it goes when the call lets go of it unless the call stores it as its own
        (it is marked unwanted with it): so also when the call dies before either.

        Returns False, changing nothing, when the hash is already stored (deduplication).
        """
        if tier is not None and tier not in TIERS:
            raise InvalidInput(f"unknown tier {tier!r}; use one of {', '.join(TIERS)}")
        key, hashes = self._chunk_key(chunk.hash), self._key("hashes")
        data = self._pack(chunk)

        def store(pipe: redis.client.Pipeline) -> bool:
            if pipe.exists(key):
                return False
            parents = chunk.parent_chunks
            live = self._present(pipe, parents)
            # Chunks computed after this one that outlived an earlier copy of it (the same
            # text loaded again, an import): their edges to it come back with it.
            waiting = _strs(pipe.smembers(self._key("children", chunk.hash)))
            restored = {
                child: self._present(pipe, self._load(pipe, child).parent_chunks, chunk.hash)
                for child in waiting
            }
            referenced = self._referenced(pipe, chunk, +1)
            pipe.multi()
            pipe.set(key, data)
            pipe.zadd(hashes, {chunk.hash: 0})
            pipe.sadd(self._key("content", chunk.content_hash), chunk.hash)
            for tag in chunk.tags:
                pipe.sadd(self._key("tag", tag), chunk.hash)
            if tier is not None:
                pipe.hset(self._key("tiers"), chunk.hash, tier)
            if made_by_call:
                pipe.set(self._key("unwanted", chunk.hash), b"1")
            if live:
                pipe.rpush(self._key("parents", chunk.hash), *live)
            for parent in parents:  # a deleted parent's too, for when it is stored again
                pipe.sadd(self._key("children", parent), chunk.hash)
            for child, its_parents in restored.items():
                pipe.delete(self._key("parents", child))
                pipe.rpush(self._key("parents", child), *its_parents)
            for source in referenced:
                pipe.set(self._chunk_key(source.hash), self._pack(source))
            return True

        # Watching the hash index serialises put/delete: a parent cannot vanish mid-put.
        return self._redis.transaction(store, key, hashes, value_from_callable=True)

    @_redis_errors
    def get(self, chunk_hash: str, context: str | None = None) -> ChunkInfo:
        """The chunk; with `context`, `is_active` says whether it is active there."""
        return self.get_many([chunk_hash], context)[0]

    @_redis_errors
    def get_many(self, hashes: Iterable[str], context: str | None = None) -> list[ChunkInfo]:
        """Several chunks in the order asked; ChunkNotFound names the first one missing."""
        hashes = [self._check_hash(h) for h in hashes]
        chunks = self._load_many(hashes, context)[0]
        for h, chunk in zip(hashes, chunks, strict=True):
            if chunk is None:
                raise ChunkNotFound(f"no chunk {h}")
        return chunks  # type: ignore[return-value]

    @_redis_errors
    def get_present(self, hashes: Iterable[str], context: str | None = None) -> list[ChunkInfo]:
        """The chunks of `hashes` that exist, in the order asked: one deleted since its hash
        was read (from an index, an active list) is simply left out."""
        hashes = [self._check_hash(h) for h in hashes]
        return [c for c in self._load_many(hashes, context)[0] if c is not None]

    @_redis_errors
    def exists(self, chunk_hash: str) -> bool:
        return bool(self._redis.exists(self._chunk_key(chunk_hash)))

    @_redis_errors
    def missing(self, hashes: Iterable[str]) -> list[str]:
        """Those of `hashes` that are not in the registry (deleted, or never stored)."""
        hashes = [self._check_hash(h) for h in hashes]
        pipe = self._redis.pipeline(transaction=False)
        for h in hashes:
            pipe.exists(self._chunk_key(h))
        return [h for h, found in zip(hashes, pipe.execute(), strict=True) if not found]

    @_redis_errors
    def update(self, chunk_hash: str, **changes: Any) -> ChunkRecord:
        """Change fields of a stored chunk (see UPDATABLE); tag index entries follow `tags`."""
        fixed = sorted(set(changes) - UPDATABLE)
        if fixed:
            raise InvalidInput(
                f"cannot update {', '.join(fixed)}; updatable: {', '.join(sorted(UPDATABLE))}"
            )
        if "tags" in changes:
            changes["tags"] = list(dict.fromkeys(check_tag(t) for t in changes["tags"]))
        return self._modify(chunk_hash, lambda chunk: dataclasses.replace(chunk, **changes))

    @_redis_errors
    def add_tag(self, chunk_hash: str, tag: str) -> ChunkRecord:
        check_tag(tag)
        return self._modify(
            chunk_hash,
            lambda c: c if tag in c.tags else dataclasses.replace(c, tags=[*c.tags, tag]),
        )

    @_redis_errors
    def remove_tag(self, chunk_hash: str, tag: str) -> ChunkRecord:
        check_tag(tag)
        return self._modify(
            chunk_hash, lambda c: dataclasses.replace(c, tags=[t for t in c.tags if t != tag])
        )

    @_redis_errors
    def delete(self, chunk_hash: str, force: bool = False) -> None:
        """Remove the chunk, its index entries, its provenance edges, its place in every
        context, its holds, and a view's references to the chunks it reads. A chunk views
        still read (ref_count > 0) raises ChunkInUse unless `force`."""
        watched = self._delete_watched(chunk_hash)

        def remove(pipe: redis.client.Pipeline) -> None:
            chunk, children, contexts = self._delete_reads(pipe, chunk_hash, force)
            self._remove(pipe, chunk, children, contexts)

        self._redis.transaction(remove, *watched)

    @_redis_errors
    def take_back(self, chunk_hash: str, marked: bool = False) -> bool:
        """Delete a chunk a call made and does not keep, as `delete` does, unless it is no
        longer the call's alone: a holder stored it as its own, another chunk was computed
        after it or a view reads it, or a context has it active (then False, and nothing
        changes). One a running call holds is marked to go when its last holder lets go
        (False). `marked`: the take-back of a chunk let_go returned, which goes only if its
        mark is still there (a keeper may have come in between). Checked in the transaction
        that deletes: none of these can come in between. One in use while a chunk computed
        after it is held is marked all the same, to be taken back again once that goes."""
        watched = self._delete_watched(chunk_hash)
        held, kept, unwanted = self._hold_keys(chunk_hash)

        def remove(pipe: redis.client.Pipeline) -> bool:
            chunk, children, contexts = self._delete_reads(pipe, chunk_hash, force=True)
            if (marked and not pipe.exists(unwanted)) or pipe.exists(kept):
                return False
            if pipe.exists(held):  # whether it is used is asked when the last hold goes
                if not marked:
                    pipe.multi()
                    pipe.set(unwanted, b"1")
                return False
            if chunk.ref_count or self._used(pipe, chunk_hash, children, contexts):
                # A chunk computed after it that a running call holds may yet go, and that
                # call holds this one too (its lineage), or is about to: marked, this one
                # goes after it when that call lets go, if nothing else uses it by then.
                waits = self._any_held(pipe, children)
                pipe.multi()
                if waits:
                    pipe.set(unwanted, b"1")
                else:
                    pipe.delete(unwanted)
                return False
            self._remove(pipe, chunk, children, contexts)
            return True

        keys = (*watched, held, kept, unwanted)
        return self._redis.transaction(remove, *keys, value_from_callable=True)

    def _delete_watched(self, chunk_hash: str) -> list[str]:
        names = ("parents", "children")
        return [
            self._chunk_key(chunk_hash),
            self._key("hashes"),
            *(self._key(name, chunk_hash) for name in names),
            self._key("contexts"),
        ]

    def _delete_reads(
        self, pipe: redis.client.Pipeline, chunk_hash: str, force: bool
    ) -> tuple[ChunkRecord, list[str], list[str]]:
        """The chunk to delete, the chunks computed after it, and every context's name."""
        chunk = self._load(pipe, chunk_hash)
        if chunk.ref_count and not force:
            raise ChunkInUse(
                f"chunk {chunk_hash[:12]} is still referenced {chunk.ref_count} time(s) "
                "by views; delete those first"
            )
        children = _strs(pipe.smembers(self._key("children", chunk_hash)))
        return chunk, children, _strs(pipe.smembers(self._key("contexts")))

    def _remove(
        self,
        pipe: redis.client.Pipeline,
        chunk: ChunkRecord,
        children: list[str],
        contexts: list[str],
    ) -> None:
        """Queue the chunk's removal (see delete) in the caller's transaction."""
        chunk_hash = chunk.hash
        referenced = self._referenced(pipe, chunk, -1)
        pipe.multi()
        # Its children set stays: they still name it, and get their edges back if it is
        # stored again (see put).
        pipe.delete(self._chunk_key(chunk_hash), self._key("parents", chunk_hash))
        pipe.delete(*self._hold_keys(chunk_hash))
        pipe.zrem(self._key("hashes"), chunk_hash)
        pipe.hdel(self._key("tiers"), chunk_hash)
        pipe.srem(self._key("content", chunk.content_hash), chunk_hash)
        for tag in chunk.tags:
            pipe.srem(self._key("tag", tag), chunk_hash)
        for parent in set(chunk.parent_chunks):
            pipe.srem(self._key("children", parent), chunk_hash)
        for child in children:
            pipe.lrem(self._key("parents", child), 0, chunk_hash)
        for name in contexts:
            pipe.lrem(self._active_key(name), 0, chunk_hash)
        for source in referenced:
            pipe.set(self._chunk_key(source.hash), self._pack(source))

    def _referenced(
        self, pipe: redis.client.Pipeline, chunk: ChunkRecord, delta: int
    ) -> list[ChunkRecord]:
        """For a view: the chunks it reads, their reference counts changed by `delta`, to be
        written in the caller's transaction (watched: a tag added meanwhile is not lost). A
        view being stored needs them all; one being deleted skips those already gone."""
        sources = list(dict.fromkeys(s.hash for s in chunk.sources))
        if chunk.layout != "view" or not sources:
            return []
        pipe.watch(*[self._chunk_key(h) for h in sources])
        if delta < 0:
            sources = self._present(pipe, sources)
        return [
            dataclasses.replace(record, ref_count=max(record.ref_count + delta, 0))
            for record in (self._load(pipe, h) for h in sources)
        ]

    def _used(
        self, pipe: redis.client.Pipeline, chunk_hash: str, children: list[str], contexts: list[str]
    ) -> bool:
        """Whether a chunk was computed after this one or a context has it active. The active
        lists are watched too: an activation before the delete commits retries it."""
        active_keys = [self._active_key(name) for name in contexts]
        if active_keys:
            pipe.watch(*active_keys)
        return bool(children) or any(
            chunk_hash in _strs(pipe.lrange(k, 0, -1)) for k in active_keys
        )

    # -- holds of running calls ---------------------------------------------------------------
    # A running call holds the chunks it makes or finds, so that another call's take-back
    # (store=False) waits for it; kept in Redis, they hold across every process and worker
    # on the registry. A call's id is `<store>:<call>`. A call that dies holding leaves its
    # holds, until its store, made again, lets go of them (holds_of, orphan_marks), a
    # live store finds that its store's lease has lapsed (lapsed_stores), or a delete
    # clears them.

    def _hold_keys(self, chunk_hash: str) -> tuple[str, str, str]:
        return tuple(self._key(name, chunk_hash) for name in ("hold", "kept", "unwanted"))

    @_redis_errors
    def hold(self, holder: str, hashes: list[str]) -> None:
        """The call `holder` holds these chunks (holding one again changes nothing, so a
        command resent after a lost reply counts once)."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.sadd(self._key("holding"), _store_of(holder))
            for chunk_hash in hashes:
                pipe.hset(self._key("hold", self._check_hash(chunk_hash)), holder, b"1")
            pipe.execute()

    @_redis_errors
    def renew_lease(self, store: str, seconds: float) -> bool:
        """The store's process is alive, for `seconds` more (see lapsed_stores). Returns
        whether its lease was still there: False after a gap (the registry away, the process
        stopped), when other stores may not have renewed theirs yet either."""
        with self._redis.pipeline() as pipe:
            pipe.exists(self._key("lease", store))
            pipe.set(self._key("lease", store), b"1", px=max(1, round(seconds * 1000)))
            existed, _ = pipe.execute()
        return bool(existed)

    @_redis_errors
    def end_lease(self, store: str) -> None:
        """The store has closed: none of its calls runs, nor holds anything, any more."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._key("lease", store))
            pipe.srem(self._key("holding"), store)
            pipe.execute()

    @_redis_errors
    def lapsed_stores(self) -> list[str]:
        """The stores whose calls have held chunks and whose lease has run out: their
        process was killed (or closed) and their calls' holds, if any are left, are dead."""
        names = sorted(n.decode() for n in self._redis.smembers(self._key("holding")))
        with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self._key("lease", name))
            alive = pipe.execute()
        return [name for name, live in zip(names, alive, strict=True) if not live]

    @_redis_errors
    def forget_store(self, store: str) -> None:
        """A lapsed store's holds are all let go: it is no longer one that holds."""
        self._redis.srem(self._key("holding"), store)

    @_redis_errors
    def held(self) -> list[str]:
        """The chunks a call holds, or that carry a mark of one (see the key layout): none
        on a quiet registry."""
        names = ("hold", "kept", "unwanted")
        return sorted({h for name in names for _, h in self._keys_of(name)})

    @_redis_errors
    def holds_of(self, stores: Iterable[str]) -> list[tuple[str, str]]:
        """Each hold of a call of these stores: (call's id, chunk hash)."""
        stores, found = set(stores), []
        for key, chunk_hash in self._keys_of("hold"):
            holders = (h.decode() for h in self._redis.hkeys(key))
            found += [(h, chunk_hash) for h in holders if _store_of(h) in stores]
        return found

    @_redis_errors
    def orphan_marks(self) -> list[str]:
        """Chunks marked to be taken back that no call holds: a call let go of them and
        has not taken them back yet, or died before it could."""
        marked = [h for _, h in self._keys_of("unwanted")]
        return [h for h in marked if not self._redis.exists(self._key("hold", h))]

    def _any_held(self, pipe: redis.client.Pipeline, hashes: list[str]) -> bool:
        """Whether a running call holds one of these chunks (the holds watched with it)."""
        keys = [self._key("hold", h) for h in hashes]
        if keys:
            pipe.watch(*keys)
        return any(pipe.exists(k) for k in keys)

    def _keys_of(self, name: str) -> Iterator[tuple[bytes, str]]:
        """Each `<name>:<chunk hash>` key of this registry, and its chunk's hash."""
        for key in self._redis.scan_iter(match=self._key(name, "*"), count=_BATCH):
            yield key, key.rsplit(b":", 1)[1].decode()

    @_redis_errors
    def let_go(self, holder: str, hashes: list[str], kept: Iterable[str] = ()) -> str | None:
        """The call `holder` lets go of these chunks in order, having stored those in `kept`
        as its own, up to the first one taken back while held that nobody holds now, which
        it returns: the caller takes it back (take_back with `marked`), then lets go of the
        rest. So a call that computed chunks after another lets go of that one only once
        they are gone. None once it has let go of them all."""
        hashes, kept = [self._check_hash(h) for h in hashes], set(kept)
        keys = [key for h in hashes for key in self._hold_keys(h)]
        flags = [b"1" if h in kept else b"0" for h in hashes]
        stop = int(self._let_go_script(keys=keys, args=[holder, *flags]))
        return hashes[stop - 1] if stop else None

    @_redis_errors
    def resolve(self, ref: str) -> str:
        """The full hash for a full hash or a unique prefix of at least 4 hex digits."""
        prefix = ref.strip().lower() if isinstance(ref, str) else ""
        if not (_HEX.fullmatch(prefix) and MIN_PREFIX <= len(prefix) <= 64):
            raise InvalidInput(
                f"{ref!r} is not a chunk hash: give its first {MIN_PREFIX} to 64 hex digits"
            )
        low = b"[" + prefix.encode()
        matches = _strs(self._redis.zrangebylex(self._key("hashes"), low, low + b"\xff"))
        if not matches:
            raise ChunkNotFound(f"no chunk has hash or prefix '{prefix}'")
        if len(matches) > 1:
            raise AmbiguousHash(prefix, matches)
        return matches[0]

    @_redis_errors
    def find(self, ref: str, context: str | None = None) -> ChunkInfo:
        """The chunk a full hash or a unique prefix names (a full hash costs one lookup)."""
        return self.find_with_active(ref, context)[0]

    def find_with_active(self, ref: str, context: str | None) -> tuple[ChunkInfo, list[str]]:
        """As `find`, with the context's active chunk hashes read in the same round trip."""
        chunks, active = self.find_many_with_active([ref], context)
        return chunks[0], active

    @_redis_errors
    def find_many_with_active(
        self, refs: list[str], context: str | None
    ) -> tuple[list[ChunkInfo], list[str]]:
        """The chunks the refs name, in order, with the context's active chunk hashes read in
        the same round trip; ChunkNotFound names the first one missing."""
        full = [self._full_hash(ref) for ref in refs]
        chunks, active = self._load_many(full, context)
        for ref, chunk in zip(full, chunks, strict=True):
            if chunk is None:
                raise ChunkNotFound(f"no chunk has hash or prefix '{ref}'")
        return chunks, active  # type: ignore[return-value]

    def _full_hash(self, ref: str) -> str:
        full = ref.strip().lower() if isinstance(ref, str) else ""
        return full if is_hash(full) else self.resolve(ref)

    @_redis_errors
    def list_chunks(
        self, pattern: str | None = None, tag: str | None = None, context: str | None = None
    ) -> list[ChunkInfo]:
        """Chunks in creation order, filtered by `tag` and by a glob `pattern`.

        The pattern matches, case-insensitively, the hash, the text, metadata["source"] or
        any tag; without any of * ? [ it matches the hash's start or a substring of the
        others ("abc" means "abc*" for the hash, "*abc*" for them).
        """
        if tag is None:
            hashes = _strs(self._redis.zrange(self._key("hashes"), 0, -1))
        else:
            hashes = _strs(self._redis.smembers(self._key("tag", check_tag(tag))))
        chunks = self.get_present(hashes, context)
        if pattern is not None and not isinstance(pattern, str):
            raise InvalidInput(f"a pattern is text, got {type(pattern).__name__}")
        if pattern:
            chunks = [c for c in chunks if _matches(c, pattern)]
        return sorted(chunks, key=lambda c: (c.created_at, c.hash))

    @_redis_errors
    def by_content(self, content_hash: str) -> list[str]:
        """Hashes of every chunk with these token ids, in any context."""
        if not is_hash(content_hash):
            raise InvalidInput(f"{content_hash!r} is not a content hash (64 hex digits)")
        return sorted(_strs(self._redis.smembers(self._key("content", content_hash))))

    @_redis_errors
    def parents(self, chunk_hash: str) -> list[str]:
        """The chunk's parents still in the registry, in computation order."""
        self._check_hash(chunk_hash)
        return _strs(self._redis.lrange(self._key("parents", chunk_hash), 0, -1))

    @_redis_errors
    def children(self, chunk_hash: str) -> list[str]:
        self._check_hash(chunk_hash)
        return sorted(_strs(self._redis.smembers(self._key("children", chunk_hash))))

    # -- contexts ----------------------------------------------------------------------

    @_redis_errors
    def contexts(self) -> list[str]:
        return sorted(_strs(self._redis.smembers(self._key("contexts"))))

    @_redis_errors
    def active(self, context: str) -> list[str]:
        """The context's active chunk hashes in activation (= layout) order."""
        return _strs(self._redis.lrange(self._active_key(context), 0, -1))

    def active_anywhere(self) -> set[str]:
        """The hashes of the chunks active in any context."""
        return {h for name in self.contexts() for h in self.active(name)}

    def activate(self, context: str, chunk_hash: str, expected: list[str] | None = None) -> bool:
        """Append the chunk to the context's active list; False if it was already there.
        With `expected`, as in `activate_many`."""
        return self.activate_many(context, [chunk_hash], expected) > 0

    @_redis_errors
    def activate_many(
        self, context: str, chunk_hashes: list[str], expected: list[str] | None = None
    ) -> int:
        """Append those of the chunks not yet in the context's active list, in order, all or
        none (ChunkNotFound if one is missing); how many were appended.

        With `expected`, only if the active list is still exactly that (else ConcurrentChange).
        """
        # One atomic script, one round trip: activation is on every request's path.
        keys = [self._active_key(context), self._key("contexts")]
        keys += [self._chunk_key(h) for h in chunk_hashes]
        guard = "" if expected is None else "=" + ",".join(expected)
        added, missing = self._activate_script(keys=keys, args=[context, guard, *chunk_hashes])
        if added == -1:
            raise ChunkNotFound(f"no chunk {_strs([missing])[0]}")
        if added == -2:
            raise ConcurrentChange(f"context {context}'s active chunks changed meanwhile")
        return added

    @_redis_errors
    def set_tiers(self, tiers: dict[str, str]) -> None:
        """Record where chunks' KV is (hash -> tier); chunks deleted meanwhile are skipped."""
        unknown = sorted(set(tiers.values()) - set(TIERS))
        if unknown:
            raise InvalidInput(f"unknown tier {unknown[0]!r}; use one of {', '.join(TIERS)}")
        pipe = self._redis.pipeline(transaction=False)
        for chunk_hash, tier in tiers.items():
            keys = [self._chunk_key(chunk_hash), self._key("tiers")]
            self._set_tier_script(keys=keys, args=[chunk_hash, tier], client=pipe)
        pipe.execute()

    @_redis_errors
    def deactivate(self, context: str, chunk_hash: str) -> bool:
        """Remove the chunk from the context's active list; False if it was not active."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(self._chunk_key(chunk_hash))
        pipe.lrem(self._active_key(context), 0, chunk_hash)
        exists, removed = pipe.execute()
        if not exists:
            raise ChunkNotFound(f"no chunk {chunk_hash}")
        return bool(removed)

    def find_and_deactivate(self, ref: str, context: str) -> ChunkInfo:
        """As `find_and_deactivate_many`, for one chunk."""
        return self.find_and_deactivate_many([ref], context)[0]

    @_redis_errors
    def find_and_deactivate_many(self, refs: list[str], context: str) -> list[ChunkInfo]:
        """Remove the chunks hashes or prefixes name (each once) from the context's active
        list and return them, read in the same round trip; all or none: ChunkNotFound names
        the first one missing and changes nothing."""
        full = list(dict.fromkeys(self._full_hash(ref) for ref in refs))
        keys = [self._active_key(check_name(context)), self._key("tiers")]
        keys += [self._chunk_key(h) for h in full]
        status, found = self._deactivate_script(keys=keys, args=full)
        if status == -1:
            raise ChunkNotFound(f"no chunk has hash or prefix '{found.decode()}'")
        return [
            self._with_state(h, found[2 * i], found[2 * i + 1], is_active=False)
            for i, h in enumerate(full)
        ]

    @_redis_errors
    def reorder(self, context: str, order: list[str], expected: list[str]) -> None:
        """Make `order` the context's active list in one step, only if the list is still
        exactly `expected` (else ConcurrentChange)."""
        keys = [self._active_key(context)]
        if self._reorder_script(keys=keys, args=[",".join(expected), *order]) == -2:
            raise ConcurrentChange(f"context {context}'s active chunks changed meanwhile")

    @_redis_errors
    def clear_context(self, context: str) -> None:
        """Deactivate every chunk of the context (its settings stay)."""
        self._redis.delete(self._active_key(context))

    @_redis_errors
    def delete_context(self, context: str) -> None:
        """Forget the context: its active list, its settings and its name (chunks stay)."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                self._active_key(context), self._key("ctx", check_name(context), "settings")
            )
            pipe.srem(self._key("contexts"), context)
            pipe.execute()

    @_redis_errors
    def settings(self, context: str) -> dict[str, Any]:
        """The context's settings as stored ({} for a context never configured)."""
        stored = self._redis.hgetall(self._key("ctx", check_name(context), "settings"))
        return {k.decode(): msgpack.unpackb(v, raw=False) for k, v in stored.items()}

    @_redis_errors
    def record_opening(self, model: str, tokens: int) -> None:
        """The length of a model's opening (every context starts with it), recorded when its
        engine starts, for the checks that run without its tokenizer (a quick activate)."""
        self._redis.hset(self._key("openings"), model, tokens)

    @_redis_errors
    def opening(self, model: str) -> int:
        """The recorded length of a model's opening; 0 if its engine never ran here."""
        return int(self._redis.hget(self._key("openings"), model) or 0)

    @_redis_errors
    def update_settings(self, context: str, values: dict[str, Any]) -> None:
        """Set some of the context's settings (values: msgpack types), keeping the others."""
        if not values:
            return
        packed = {}
        for name, value in values.items():
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"invalid setting name {name!r}")
            try:
                packed[name] = msgpack.packb(value, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as e:
                raise InvalidInput(f"setting {name} cannot be stored: {e}") from e
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("ctx", check_name(context), "settings"), mapping=packed)
            pipe.sadd(self._key("contexts"), context)
            pipe.execute()

    # -- internals ---------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def _chunk_key(self, chunk_hash: str) -> str:
        return self._key("chunk", self._check_hash(chunk_hash))

    def _active_key(self, context: str) -> str:
        return self._key("ctx", check_name(context), "active")

    @staticmethod
    def _check_hash(chunk_hash: str) -> str:
        if not is_hash(chunk_hash):
            raise InvalidInput(
                f"{chunk_hash!r} is not a full chunk hash (64 hex digits); resolve prefixes first"
            )
        return chunk_hash

    @staticmethod
    def _pack(chunk: ChunkRecord) -> bytes:
        return pack_record(chunk.to_record())

    def _present(
        self, pipe: redis.client.Pipeline, hashes: list[str], arriving: str | None = None
    ) -> list[str]:
        """Those of `hashes` that are stored (or are `arriving`, being stored now), in order."""
        scores = pipe.zmscore(self._key("hashes"), hashes) if hashes else []
        return [
            h for h, score in zip(hashes, scores, strict=True) if score is not None or h == arriving
        ]

    def _load(self, pipe: redis.client.Pipeline, chunk_hash: str) -> ChunkRecord:
        data = pipe.get(self._chunk_key(chunk_hash))
        if data is None:
            raise ChunkNotFound(f"no chunk {chunk_hash}")
        return self._parsed(chunk_hash, data)

    def _load_many(
        self, hashes: list[str], context: str | None
    ) -> tuple[list[ChunkInfo | None], list[str]]:
        """The chunks (None where missing) and, with `context`, its active chunk hashes."""
        active: list[str] = []
        chunks: list[ChunkInfo | None] = []
        for start in range(0, len(hashes), _BATCH):
            batch = hashes[start : start + _BATCH]
            pipe = self._redis.pipeline(transaction=False)
            pipe.mget([self._key("chunk", h) for h in batch])
            pipe.hmget(self._key("tiers"), batch)
            if context is not None and start == 0:
                pipe.lrange(self._active_key(check_name(context)), 0, -1)
            records, tiers, *listed = pipe.execute()
            if listed:
                active = _strs(listed[0])
            chunks += [
                None if data is None else self._with_state(h, data, tier, h in active)
                for h, data, tier in zip(batch, records, tiers, strict=True)
            ]
        return chunks, active

    def _with_state(
        self, chunk_hash: str, data: bytes, tier: bytes | None, is_active: bool
    ) -> ChunkInfo:
        """The view of the chunk: its record, the tier recorded apart (a chunk whose tier was
        never recorded has its KV in its file) and its activity."""
        return ChunkInfo.view(
            self._parsed(chunk_hash, data), tier.decode() if tier else "disk", is_active
        )

    def _modify(self, chunk_hash: str, change: Callable[[ChunkRecord], ChunkRecord]) -> ChunkRecord:
        """Read-modify-write one record under WATCH, keeping the tag index in step."""
        key = self._chunk_key(chunk_hash)

        def apply(pipe: redis.client.Pipeline) -> ChunkRecord:
            old = self._load(pipe, chunk_hash)
            new = change(old)
            pipe.multi()
            pipe.set(key, self._pack(new))
            for tag in set(new.tags) - set(old.tags):
                pipe.sadd(self._key("tag", tag), chunk_hash)
            for tag in set(old.tags) - set(new.tags):
                pipe.srem(self._key("tag", tag), chunk_hash)
            return new

        return self._redis.transaction(apply, key, value_from_callable=True)


def _strs(values: Iterable[bytes]) -> list[str]:
    return [v.decode() for v in values]


def _matches(chunk: ChunkInfo, pattern: str) -> bool:
    pattern = pattern.lower()
    # Without glob characters a hash is matched from its start, as a ref is ("12" inside a
    # hash is chance), the other fields anywhere.
    plain = not any(c in pattern for c in "*?[")
    hash_glob, glob = (f"{pattern}*", f"*{pattern}*") if plain else (pattern, pattern)
    source = chunk.metadata.get("source")
    fields = [chunk.text, *chunk.tags, *([source] if isinstance(source, str) else [])]
    return fnmatch.fnmatchcase(chunk.hash, hash_glob) or any(
        fnmatch.fnmatchcase(f.lower(), glob) for f in fields
    )


class ParsedRecords:
    """Chunk records parsed and checked once per content. A record read again unchanged comes
    back as a copy of its last parse: checking thousands of token ids costs more than the
    read. Keeps the latest records up to `max_tokens` token ids in all."""

    def __init__(self, max_tokens: int = 1 << 20):
        self.max_tokens = max_tokens
        self._records: dict[str, tuple[bytes, ChunkRecord]] = {}  # oldest first
        self._tokens = 0
        self._lock = threading.Lock()

    def __call__(self, chunk_hash: str, data: bytes) -> ChunkRecord:
        with self._lock:
            known = self._records.get(chunk_hash)
        if known is None or known[0] != data:
            known = (data, ChunkRecord.from_record(unpack_record(data)))
            self._keep(chunk_hash, known)
        return known[1].copy()

    def _keep(self, chunk_hash: str, parsed: tuple[bytes, ChunkRecord]) -> None:
        with self._lock:
            old = self._records.pop(chunk_hash, None)
            self._tokens -= old[1].token_count if old else 0
            self._records[chunk_hash] = parsed
            self._tokens += parsed[1].token_count
            while self._tokens > self.max_tokens and len(self._records) > 1:
                dropped = self._records.pop(next(iter(self._records)))
                self._tokens -= dropped[1].token_count
