"""The chunk record (`ChunkInfo`) and its msgpack form, shared by the registry and KV files.

A record is a plain dict of msgpack types (no pickle), so it can be stored in Redis and in a
safetensors header and read back from untrusted files: `from_record` checks every type.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from kvchunks.common import InvalidInput
from kvchunks.vocabulary import KINDS, LAYOUTS, ROLES, TIERS, check_tag

RECORD_VERSION = 1
# Fields that say where a chunk's KV is in one process (`segments`, filled in by the service's
# views) or whether one context has it active (`is_active`, filled in by the registry when
# a chunk is read for a context): never part of a record.
RUNTIME = ("segments", "is_active")

MAX_TOKEN_ID = 2**31 - 1  # token ids are hashed as int32
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_hash(value: object) -> bool:
    """Whether `value` is a full chunk hash: 64 lowercase hex digits."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


@dataclass(frozen=True)
class SourceSpan:
    """`length` tokens of chunk `hash` from token `offset`: one piece of a composed/split view."""

    hash: str
    offset: int
    length: int


@dataclass
class ChunkInfo:
    """One content-addressed chunk: its tokens, where its KV lives, and how it was made.

    `segments` is the chunk's KV in the paged pool (the engine's KVSegments; empty when not
    resident there), filled in by the service for its caller and never stored.
    `sources` are the spans of other chunks a composed or split view reads (empty otherwise).
    `is_active` is not a property of the chunk but of a context: the registry fills it in
    when the chunk is read for a context and never stores it. `token_count` is derived
    from `token_ids`.
    """

    hash: str
    content_hash: str
    token_ids: list[int]
    role: str = "raw"
    kind: str = "input"
    tier: str = "gpu"
    position: int = 0
    layout: str = "standalone"
    segments: list = field(default_factory=list)  # the engine's KVSegments (runtime)
    parent_chunks: list[str] = field(default_factory=list)
    sources: list[SourceSpan] = field(default_factory=list)
    generation_params: dict | None = None
    metadata: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    text: str = ""
    created_at: float = field(default_factory=time.time)
    ref_count: int = 0
    is_active: bool = False

    def __post_init__(self) -> None:
        _check(is_hash(self.hash), "hash", "64 lowercase hex digits")
        _check(is_hash(self.content_hash), "content_hash", "64 lowercase hex digits")
        _check(_is_token_list(self.token_ids), "token_ids", f"a list of ints in 0..{MAX_TOKEN_ID}")
        _check(self.role in ROLES, "role", " / ".join(ROLES))
        _check(self.kind in KINDS, "kind", " / ".join(KINDS))
        _check(self.tier in TIERS, "tier", " / ".join(TIERS))
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
        _check(isinstance(self.is_active, bool), "is_active", "a bool")

    def copy(self) -> ChunkInfo:
        """A copy with lists and dicts of its own, made without checking the fields again."""
        twin = copy.copy(self)
        for name in ("token_ids", "segments", "parent_chunks", "sources", "tags"):
            setattr(twin, name, list(getattr(self, name)))
        twin.metadata = copy.deepcopy(self.metadata)
        twin.generation_params = copy.deepcopy(self.generation_params)
        return twin

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    def to_record(self) -> dict[str, Any]:
        """What is kept of the chunk, as a dict of msgpack types: every field but the state
        of one process or context (RUNTIME). `from_record` gives the chunk back, with the
        runtime fields at their defaults."""
        record: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUNTIME
        }
        record["sources"] = [[s.hash, s.offset, s.length] for s in self.sources]
        record["token_count"] = self.token_count
        record["version"] = RECORD_VERSION
        return record

    def to_json(self, tokens: bool = False) -> dict[str, Any]:
        """The chunk as JSON values, as `kvchunks info --json` and the HTTP API show it
        (`tokens` adds the token ids)."""
        doc = {
            "hash": self.hash,
            "content_hash": self.content_hash,
            "role": self.role,
            "kind": self.kind,
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

    @classmethod
    def from_record(cls, record: object) -> ChunkInfo:
        """Rebuild a chunk from `to_record` output, checking every type (records may be hostile).

        Keys the chunk does not have are ignored.
        """
        if not isinstance(record, dict):
            raise InvalidInput("a chunk record must be a map")
        if record.get("version") != RECORD_VERSION:
            raise InvalidInput(f"unsupported chunk record version {record.get('version')!r}")
        kept = [f.name for f in fields(cls) if f.name not in RUNTIME]
        missing = [name for name in kept if name not in record]
        if missing:
            raise InvalidInput(f"chunk record is missing {', '.join(missing)}")
        values = {name: record[name] for name in kept}
        values["sources"] = [_source(s) for s in _as_list(values["sources"], "sources")]
        chunk = cls(**values)
        if record.get("token_count") != chunk.token_count:
            raise InvalidInput("chunk record token_count does not match its token_ids")
        return chunk


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
