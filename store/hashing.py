"""Content addresses: SHA-256 over canonical bytes, identical on every machine and run.

Every digest starts with a domain tag (so a context hash can never equal a chunk hash of the
same bytes) and every variable-length field is length-prefixed (so no two different inputs
produce the same byte string by shifting a boundary). Integers are fixed-width little-endian.
Never Python's `hash` (salted per process) and never pickle (not canonical).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from kvchunks.common import InvalidInput
from kvchunks.store.chunk import MAX_TOKEN_ID, is_hash

_READ_SIZE = 1 << 20


def model_fingerprint(
    architecture: str, weights_digest: str, dtype: str, block_size: int, opening: Sequence[int]
) -> str:
    """Identity of the KV a model produces: same fingerprint, interchangeable KV. `opening`
    is what every context starts with (ChatFormat.opening): all KV is computed after it."""
    for name, value in (("architecture", architecture), ("dtype", dtype)):
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"model fingerprint needs a non-empty {name}")
    if not is_hash(weights_digest):
        raise InvalidInput("model fingerprint needs the weights digest as 64 hex digits")
    if type(block_size) is not int or block_size <= 0:
        raise InvalidInput(f"block size must be a positive int, not {block_size!r}")
    return _digest(
        b"model",
        architecture.encode(),
        bytes.fromhex(weights_digest),
        dtype.encode(),
        _u64(block_size),
        _int32s(opening),
    )


def weights_digest(paths: list[Path]) -> str:
    """SHA-256 of the weight files' bytes, streamed, in sorted file-name order.

    Each file is framed by its size, so moving bytes between shards changes the digest.
    Reading gigabytes takes seconds: callers cache the result (keyed by path, size, mtime).
    """
    if not paths:
        raise InvalidInput("no weight files to digest")
    files = sorted((Path(p) for p in paths), key=lambda p: (p.name, str(p)))
    h = _hasher(b"weights")
    h.update(_u64(len(files)))
    buffer = bytearray(_READ_SIZE)
    view = memoryview(buffer)
    for path in files:
        try:
            with open(path, "rb") as f:
                h.update(_u64(path.stat().st_size))
                while n := f.readinto(buffer):
                    h.update(view[:n])
        except OSError as e:
            raise InvalidInput(f"cannot read weight file {path}: {e.strerror or e}") from e
    return h.hexdigest()


def context_hash(parents: list[tuple[str, int]], combine: str = "") -> str:
    """Hash of the KV context a chunk was computed in: ordered (parent hash, position) pairs.

    `combine` names how the parents' KV was combined when that changes the result (a
    composition mode); empty when they form one timeline. An empty list is the context of
    a standalone chunk and has its own fixed hash.
    """
    h = _hasher(b"context")
    if combine:
        h.update(_field(combine.encode()))
    h.update(_u64(len(parents)))
    for parent, position in parents:
        if not is_hash(parent):
            raise InvalidInput(f"context parent {parent!r} is not a full chunk hash")
        h.update(bytes.fromhex(parent))
        h.update(_u64(_position(position)))
    return h.hexdigest()


def composition_key(layout: list[tuple[str, int, int]], combine: str) -> str:
    """The address of derived KV: the token ranges [start, end) of chunks it lays out, in
    order, and the name of how they were combined."""
    h = _hasher(b"composition")
    h.update(_field(combine.encode()))
    h.update(_u64(len(layout)))
    for chunk, start, end in layout:
        if not is_hash(chunk):
            raise InvalidInput(f"composition part {chunk!r} is not a full chunk hash")
        h.update(bytes.fromhex(chunk))
        h.update(_u64(start))
        h.update(_u64(end))
    return h.hexdigest()


def chunk_hash(
    fingerprint: str, context_hash: str, position_offset: int, token_ids: Sequence[int]
) -> str:
    """The content address of a chunk: its tokens, where they sit, what they attended to, and
    the model that computed their KV."""
    for name, value in (("model fingerprint", fingerprint), ("context hash", context_hash)):
        if not is_hash(value):
            raise InvalidInput(f"{name} must be 64 hex digits, not {value!r}")
    return _digest(
        b"chunk",
        bytes.fromhex(fingerprint),
        bytes.fromhex(context_hash),
        _u64(_position(position_offset)),
        _int32s(token_ids),
    )


def content_hash(token_ids: Sequence[int]) -> str:
    """Hash of the tokens alone: finds the same text computed in any context or model."""
    return _digest(b"content", _int32s(token_ids))


def _hasher(domain: bytes) -> hashlib._Hash:
    h = hashlib.sha256()
    h.update(_field(b"kvchunks/" + domain + b"/v1"))
    return h


def _digest(domain: bytes, *values: bytes) -> str:
    h = _hasher(domain)
    for value in values:
        h.update(_field(value))
    return h.hexdigest()


def _field(value: bytes) -> bytes:
    return _u64(len(value)) + value


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _position(value: object) -> int:
    if type(value) is not int or value < 0:
        raise InvalidInput(f"a position must be an int >= 0, not {value!r}")
    return value


def _int32s(token_ids: Iterable[int]) -> bytes:
    ids = list(token_ids)
    if not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in ids):
        raise InvalidInput(f"token ids must be ints in 0..{MAX_TOKEN_ID}")
    return struct.pack(f"<{len(ids)}i", *ids)
