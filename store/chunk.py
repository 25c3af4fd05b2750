"""A chunk as it is kept (`ChunkRecord`) and as a caller sees it (`ChunkInfo`), and the
record's msgpack form, shared by the registry and KV files.

A record is a plain dict of msgpack types (no pickle), so it can be stored in Redis and in a
safetensors header and read back from untrusted files: `from_record` checks every type.
A view adds what only a running system knows: the tier the chunk's KV is in, its blocks in
one process's pool and whether one context has it active. `ChunkInfo.view` is the one place
a view is made.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any, Self

import msgpack

from kvchunks.common import DtypeMismatch, InvalidInput
from kvchunks.vocabulary import KINDS, LAYOUTS, ROLES, TIERS, check_tag

RECORD_VERSION = 1
MAX_TOKEN_ID = 2**31 - 1  # token ids are hashed as int32
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_hash(value: object) -> bool:
    """Whether `value` is a full chunk hash: 64 lowercase hex digits."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


@functools.cache
def _container_fields(cls: type) -> tuple[str, ...]:
    """The fields of a record class declared as lists or dicts: a copy has its own."""
    return tuple(f.name for f in fields(cls) if str(f.type).startswith(("list", "dict")))


def _own(value: Any) -> Any:
    """A container field's value, copied. A record's lists hold immutable items (token
    ids, hashes, frozen spans and segments), so a shallow copy is enough; its dicts hold
    msgpack values at any depth. Every read of a record makes a copy, and `deepcopy`
    took half the time of listing a thousand chunks."""
    if isinstance(value, list):
        return list(value)
    return _deep_copy(value) if isinstance(value, dict) else value


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


@dataclass(frozen=True)
class SourceSpan:
    """`length` tokens of chunk `hash` from token `offset`: one piece of a composed/split view."""

    hash: str
    offset: int
    length: int


@dataclass
class ChunkRecord:
    """One content-addressed chunk as the registry and its KV file keep it: its tokens and
    how it was made. `sources` are the spans of other chunks a composed or split view reads
    (empty otherwise). `token_count` is derived from `token_ids`."""

    hash: str
    content_hash: str
    token_ids: list[int]
    role: str = "raw"
    kind: str = "input"
    position: int = 0
    layout: str = "standalone"
    parent_chunks: list[str] = field(default_factory=list)
    sources: list[SourceSpan] = field(default_factory=list)
    generation_params: dict | None = None
    metadata: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    text: str = ""
    created_at: float = field(default_factory=time.time)
    ref_count: int = 0

    def __post_init__(self) -> None:
        _check(is_hash(self.hash), "hash", "64 lowercase hex digits")
        _check(is_hash(self.content_hash), "content_hash", "64 lowercase hex digits")
        _check(_is_token_list(self.token_ids), "token_ids", f"a list of ints in 0..{MAX_TOKEN_ID}")
        _check(self.role in ROLES, "role", " / ".join(ROLES))
        _check(self.kind in KINDS, "kind", " / ".join(KINDS))
        _check(self.layout in LAYOUTS, "layout", " / ".join(LAYOUTS))
        _check(_is_count(self.position), "position", "an int >= 0")
        _check(_is_count(self.ref_count), "ref_count", "an int >= 0")
        _check(_list_of(self.sources, SourceSpan), "sources", "a list of SourceSpan")
        _check(
            isinstance(self.parent_chunks, list) and all(map(is_hash, self.parent_chunks)),
            "parent_chunks",
            "a list of full hashes",
        )
        _check(isinstance(self.tags, list), "tags", "a list of strings")
        for tag in self.tags:
            check_tag(tag)
        _check(_is_str_dict(self.metadata), "metadata", "a dict with string keys")
        _check(
            self.generation_params is None or _is_str_dict(self.generation_params),
            "generation_params",
            "a dict with string keys or None",
        )
        _check(isinstance(self.text, str), "text", "a string")
        _check(_is_number(self.created_at), "created_at", "a number")

    def copy(self) -> Self:
        """A copy with lists and dicts of its own, made without checking the fields again."""
        twin = object.__new__(type(self))
        state = vars(twin)
        state.update(vars(self))
        for name in _container_fields(type(self)):
            state[name] = _own(state[name])
        return twin

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    @property
    def packs(self) -> bool:
        """Whether the chunk's KV is packed into blocks other chunks partly fill: a standalone
        chunk's. A timeline's chunks are not, so that an answer goes on in the last block of
        its prompt (see BlockManager)."""
        return self.layout == "standalone"

    def to_record(self) -> dict[str, Any]:
        """What is kept of the chunk, as a dict of msgpack types (a view's runtime state is
        left out); `from_record` gives the record back."""
        record: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(ChunkRecord)}
        record["sources"] = [[s.hash, s.offset, s.length] for s in self.sources]
        record["token_count"] = self.token_count
        record["version"] = RECORD_VERSION
        return record

    @staticmethod
    def from_record(record: object) -> ChunkRecord:
        """Rebuild a chunk from `to_record` output, checking every type (records may be hostile).

        Keys the record does not have are ignored.
        """
        if not isinstance(record, dict):
            raise InvalidInput("a chunk record must be a map")
        if record.get("version") != RECORD_VERSION:
            raise InvalidInput(f"unsupported chunk record version {record.get('version')!r}")
        kept = [f.name for f in fields(ChunkRecord)]
        missing = [name for name in kept if name not in record]
        if missing:
            raise InvalidInput(f"chunk record is missing {', '.join(missing)}")
        values = {name: record[name] for name in kept}
        values["sources"] = [_source(s) for s in _as_list(values["sources"], "sources")]
        chunk = ChunkRecord(**values)
        if record.get("token_count") != chunk.token_count:
            raise InvalidInput("chunk record token_count does not match its token_ids")
        return chunk


@dataclass
class ChunkInfo(ChunkRecord):
    """A chunk as a caller sees it: its record, the tier its KV is in, `segments`, its KV in
    this process's paged pool (the engine's KVSegments; empty when not resident there), and
    `is_active`, whether the context it was read for has it active."""

    tier: str = "gpu"
    segments: list = field(default_factory=list)
    is_active: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.tier in TIERS, "tier", " / ".join(TIERS))
        _check(isinstance(self.is_active, bool), "is_active", "a bool")

    @classmethod
    def view(
        cls,
        record: ChunkRecord,
        tier: str,
        is_active: bool = False,
        segments: list | None = None,
    ) -> ChunkInfo:
        """The view of a record. The record's fields are shared, not copied, and not checked
        again: a record was checked when it was made or read, and checking thousands of
        token ids costs more than reading them."""
        chunk = cls.__new__(cls)
        vars(chunk).update(
            vars(record), tier=tier, is_active=is_active, segments=list(segments or [])
        )
        return chunk

    @property
    def type(self) -> str:
        """What the chunk is in a conversation: an answer (generated, or an assistant message
        of a resent conversation), a prompt (a user turn, even asked with nothing active, or
        any input computed after other chunks), a document (an input loaded on its own), or
        a composed or split view."""
        if self.kind == "output" or (self.kind == "input" and self.role == "assistant"):
            return "answer"
        if self.kind != "input":
            return self.kind
        return "prompt" if self.role == "user" or self.parent_chunks else "document"

    def to_json(self, tokens: bool = False) -> dict[str, Any]:
        """The chunk as JSON values, as `kvchunks info --json` and the HTTP API show it
        (`tokens` adds the token ids)."""
        doc = {
            "hash": self.hash,
            "content_hash": self.content_hash,
            "role": self.role,
            "kind": self.kind,
            "type": self.type,
            "tier": self.tier,
            "layout": self.layout,
            "position": self.position,
            "token_count": self.token_count,
            "is_active": self.is_active,
            "tags": list(self.tags),
            "metadata": self.metadata,
            "parent_chunks": list(self.parent_chunks),
            "sources": [vars(s) for s in self.sources],
            "segments": [
                {
                    "blocks": list(s.blocks),
                    "start": s.start,
                    "length": s.length,
                    "position": s.position,
                    "shift": s.shift,
                }
                for s in self.segments
            ],
            "generation_params": self.generation_params,
            "ref_count": self.ref_count,
            "created_at": self.created_at,
            "text": self.text,
        }
        if tokens:
            doc["token_ids"] = list(self.token_ids)
        return doc


def check_dtype(chunks: list[ChunkRecord], dtype: str) -> None:
    """Refuse chunks computed in another dtype than `dtype` (each records its own in its
    metadata; one that records none passes)."""
    for chunk in chunks:
        found = chunk.metadata.get("dtype", dtype)
        if found != dtype:
            raise DtypeMismatch(f"chunk {chunk.hash[:12]}", found, dtype)


def pack_record(record: dict[str, Any]) -> bytes:
    try:
        return msgpack.packb(record, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"chunk record cannot be stored: {e}") from e


def unpack_record(data: bytes) -> dict[str, Any]:
    """Decode msgpack bytes into a record dict; never executes anything (no ext hooks)."""
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types (ValueError, StackError, ExtraData...)
        raise InvalidInput(f"chunk record is not valid msgpack: {type(e).__name__}") from e
    if not isinstance(record, dict):
        raise InvalidInput("a chunk record must be a map")
    return record


def _check(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise InvalidInput(f"chunk field '{name}' must be {expected}")


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _is_count_list(value: object, most: int | None = None) -> bool:
    # set/min/max run in C: records carry thousands of token ids and are read on every toggle.
    if not isinstance(value, list):
        return False
    if not value:
        return True
    return (
        set(map(type, value)) == {int} and min(value) >= 0 and (most is None or max(value) <= most)
    )


def _is_token_list(value: object) -> bool:
    return _is_count_list(value, MAX_TOKEN_ID)


def _is_str_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _list_of(value: object, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _as_list(value: object, name: str) -> list:
    _check(isinstance(value, list), name, "a list")
    return value  # type: ignore[return-value]


def _source(item: object) -> SourceSpan:
    ok = (
        isinstance(item, list)
        and len(item) == 3
        and is_hash(item[0])
        and _is_count(item[1])
        and _is_count(item[2])
    )
    _check(ok, "sources", "[hash, offset, length] entries")
    return SourceSpan(*item)  # type: ignore[misc]
