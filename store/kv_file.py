"""KV on disk: one safetensors file per chunk, checked on every read.

Tensors `k` and `v`, each [num_layers, T, num_kv_heads, head_dim]: one tensor per side rather
than per layer, because a chunk is always loaded whole and two entries keep the header small.

`__metadata__` (safetensors allows strings only):
    format         "kvchunks-kv"
    version        "2" (files of version "1" are still read)
    fingerprint    model fingerprint the KV was computed with (64 hex digits)
    dtype          the KV's dtype in the model: float32, bfloat16 or float16
    compression    "none": stored in `dtype`; "bf16": stored down-cast to bfloat16 (lossy,
                   declared so a reader casts back to `dtype`)
    shape          "L,T,H,D"
    sha256         version 2: SHA-256 of the SHA-256 digests of the stored bytes' 1 MiB
                   pieces, `k`'s pieces then `v`'s (each tensor's last piece may be shorter);
                   version 1: SHA-256 of the stored `k` bytes followed by the stored `v` bytes
    record         base64 of the msgpack chunk record (ChunkRecord.to_record)
    record_sha256  SHA-256 of those msgpack bytes, so a flipped token id is caught too

Version 2 hashes the pieces on several threads, so the check keeps up with a disk that one
SHA-256 stream (about 1.5 GB/s on a core with SHA instructions) would hold back.

Readers parse and check the header themselves, with size limits, and take the tensors as
views of the checked byte spans; every problem is a ChunkFileError with one line. Nothing here
uses pickle or torch.load.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from kvchunks.common import ChunkFileError, DtypeMismatch, InvalidInput
from kvchunks.store.chunk import ChunkRecord, is_hash, pack_record, unpack_record
from kvchunks.vocabulary import DTYPES

FORMAT = "kvchunks-kv"
VERSION = "2"
READABLE_VERSIONS = ("1", VERSION)
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_DTYPE_NAMES = {d: n for n, d in TORCH_DTYPES.items()}
_STORED = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # safetensors' names
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
COMPRESSIONS = ("none", "bf16")
MAX_HEADER_BYTES = 64 << 20  # a record holds token ids and text: far below this
_READ_STEP = 2 << 20  # bytes read per call while the previous ones are hashed
_PIECE = 1 << 20  # bytes per hashed piece (version 2)
_HASHERS = min(4, os.cpu_count() or 1)
_UNHASHED = "0" * 64  # the checksum's place in a header being written
_META_KEYS = (
    "format",
    "version",
    "fingerprint",
    "dtype",
    "compression",
    "shape",
    "sha256",
    "record",
    "record_sha256",
)


@dataclass(frozen=True)
class KVHeader:
    version: str
    fingerprint: str
    dtype: str  # the KV's dtype in the model, after undoing `compression`
    compression: str
    shape: tuple[int, int, int, int]  # (num_layers, T, num_kv_heads, head_dim)
    sha256: str
    record: dict[str, Any]


def kv_path(data_dir: Path, chunk_hash: str) -> Path:
    """Canonical location of a chunk's KV: <data_dir>/kv/<hash[:2]>/<hash>.safetensors."""
    if not is_hash(chunk_hash):
        raise InvalidInput(f"{chunk_hash!r} is not a full chunk hash")
    return Path(data_dir) / "kv" / chunk_hash[:2] / f"{chunk_hash}.safetensors"


@contextlib.contextmanager
def claimed(data_dir: Path, chunk_hash: str) -> Iterator[None]:
    """Hold the chunk's file against the other processes on this data directory (a node's
    workers and its DiskStore): making a chunk (file, then record) and deleting it (record,
    then file) each hold it throughout, so that neither removes the other's file. One lock
    file serves the 1/256 of the hashes that share a folder."""
    lock = kv_path(data_dir, chunk_hash).with_name(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:  # closing it lets go
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_kv_file(
    path: Path,
    k: torch.Tensor,
    v: torch.Tensor,
    record: dict[str, Any],
    fingerprint: str,
    compression: str = "none",
) -> KVHeader:
    """Write the chunk's KV atomically: a complete file at `path`, or no change at all."""
    path = Path(path)
    dtype, shape = _check_tensors(k, v, record)
    if not is_hash(fingerprint):
        raise InvalidInput("a model fingerprint is 64 hex digits")
    if compression not in COMPRESSIONS:
        raise InvalidInput(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
    stored = stored_dtype(k.dtype, compression)
    tensors = [t.detach().to("cpu", stored).contiguous() for t in (k, v)]
    packed = pack_record(record)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "dtype": dtype,
        "compression": compression,
        "shape": ",".join(map(str, shape)),
        "sha256": _UNHASHED,
        "record": base64.b64encode(packed).decode("ascii"),
        "record_sha256": hashlib.sha256(packed).hexdigest(),
    }
    if len(metadata["record"]) > MAX_HEADER_BYTES // 2:
        raise InvalidInput(f"chunk record too large for a KV file ({len(packed)} bytes)")
    digest = _atomic_save(path, _safetensors_header(tensors, metadata), tensors)
    return KVHeader(VERSION, fingerprint, dtype, compression, shape, digest, record)


def stored_dtype(dtype: torch.dtype, compression: str) -> torch.dtype:
    """The dtype a file keeps KV of `dtype` in, under `compression`."""
    return torch.bfloat16 if compression == "bf16" else dtype


def stored_nbytes(k: torch.Tensor, v: torch.Tensor, compression: str) -> int:
    """The bytes k and v take in a file, under `compression` (the header aside)."""
    return (k.numel() + v.numel()) * stored_dtype(k.dtype, compression).itemsize


def read_kv_header(path: Path) -> KVHeader:
    """The file's metadata, checked, without reading the KV bytes."""
    path = Path(path)
    with _open(path) as f:
        return _parse(f, os.fstat(f.fileno()).st_size, path)[0]


def read_kv_file(
    path: Path,
    expect_fingerprint: str | None = None,
    expect_dtype: str | torch.dtype | None = None,
    expect_shape: tuple[int | None, ...] | None = None,
    buffer: Callable[[int], torch.Tensor] | None = None,
    expect_hash: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], KVHeader]:
    """Load and verify a chunk's KV: (k, v, record, header), k and v in the header's dtype.

    `expect_shape` is (num_layers, T, num_kv_heads, head_dim); None in it matches any size.
    `expect_hash`: the chunk the file must hold (a sound file of another chunk is refused).
    The file is read into `buffer(file_size)` (a flat uint8 tensor), by default new memory;
    k and v are views of it unless the file's compression is undone.
    """
    path = Path(path)
    with _open(path) as f:
        # Check the header (sizes included) and the expectations before reading the KV.
        size = os.fstat(f.fileno()).st_size
        header, spans = _parse(f, size, path)
        _check_expected(header, path, expect_fingerprint, expect_dtype, expect_shape)
        if expect_hash is not None and header.record["hash"] != expect_hash:
            found = header.record["hash"][:12]
            raise ChunkFileError(f"chunk file {path} holds chunk {found}, not {expect_hash[:12]}")
        f.seek(0)
        into = buffer(size) if buffer else torch.empty(size, dtype=torch.uint8)
        data = memoryview(into.numpy())  # not zeroed: every byte is read
        digest = _read_hashed(f, data, header, spans, path)
    # Parse again from the bytes in hand, so the header and the KV come from one read.
    (length,) = struct.unpack_from("<Q", data)
    again = _parse(io.BytesIO(data[: 8 + min(length, MAX_HEADER_BYTES)].tobytes()), size, path)
    if again != (header, spans):
        raise ChunkFileError(f"chunk file {path} changed while it was read")
    if digest != header.sha256:
        raise ChunkFileError(f"chunk file {path} is corrupted: its KV fails the SHA-256 check")
    # The spans' dtype, shape and bounds are checked: the tensors are views of the buffer.
    stored = stored_dtype(TORCH_DTYPES[header.dtype], header.compression)
    k, v = (
        torch.frombuffer(data, dtype=stored, count=(end - start) // stored.itemsize, offset=start)
        .view(header.shape)
        .to(TORCH_DTYPES[header.dtype])
        for start, end in spans
    )
    return k, v, header.record, header


def _read_hashed(
    f: BinaryIO, data: memoryview, header: KVHeader, spans: list[tuple[int, int]], path: Path
) -> str:
    """Read the file into `data` while other threads hash the pieces already read: reads and
    SHA-256 release the GIL, so the check costs little more than the read from disk."""
    if header.version == "1":  # one stream: hashed after the read
        _read_into(f, data, path, lambda done: None)
        return _sha256([data[start:end] for start, end in spans])
    waiting = deque(_pieces(spans))  # k's, then v's (the digest's order, whatever the file's)
    with ThreadPoolExecutor(_HASHERS, thread_name_prefix="kvchunks-sha256") as hashers:
        leaves = []

        def hash_read(done: int) -> None:
            while waiting and waiting[0][1] <= done:
                start, end = waiting.popleft()
                leaves.append(hashers.submit(_digest, data[start:end]))

        _read_into(f, data, path, hash_read)
        return _root(leaf.result() for leaf in leaves)


def _read_into(f: BinaryIO, data: memoryview, path: Path, on_read: Callable[[int], None]) -> None:
    """Fill `data` from `f` in steps, telling `on_read` how many bytes are in after each."""
    done = 0
    while done < len(data):
        n = f.readinto(data[done : done + _READ_STEP])
        if not n:
            raise ChunkFileError(f"chunk file {path} changed size while it was read")
        done += n
        on_read(done)


def _pieces(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(at, min(at + _PIECE, end)) for start, end in spans for at in range(start, end, _PIECE)]


def _digest(piece: memoryview) -> bytes:
    return hashlib.sha256(piece).digest()


def _root(leaves: Iterable[bytes]) -> str:
    return hashlib.sha256(b"".join(leaves)).hexdigest()


def _check_tensors(
    k: torch.Tensor, v: torch.Tensor, record: dict[str, Any]
) -> tuple[str, tuple[int, int, int, int]]:
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        raise InvalidInput("k and v must be tensors")
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype:
        raise InvalidInput(
            f"k and v must both be [layers, tokens, kv_heads, head_dim] of one dtype, "
            f"got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}"
        )
    if k.dtype not in _DTYPE_NAMES:
        raise InvalidInput(f"KV dtype {k.dtype} is not one of {', '.join(DTYPES)}")
    if k.numel() == 0:
        raise InvalidInput(f"no KV to write: shape {tuple(k.shape)}")
    chunk = ChunkRecord.from_record(record)
    if chunk.token_count != k.shape[1]:
        raise InvalidInput(f"record has {chunk.token_count} tokens but the KV has {k.shape[1]}")
    return _DTYPE_NAMES[k.dtype], tuple(k.shape)  # type: ignore[return-value]


def _safetensors_header(tensors: list[torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding `k` then `v`, padded
    with spaces so that the tensor bytes start 8-byte aligned (as the format recommends)."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in zip(("k", "v"), tensors, strict=True):
        dtype = _STORED[_DTYPE_NAMES[t.dtype]]
        entries[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _atomic_save(path: Path, header: bytes, tensors: list[torch.Tensor]) -> str:
    """Write header and tensors to a temp file in the target directory, fsync, rename over,
    fsync the directory: a crash leaves the old file or the new one, never half of one.

    The header's checksum is filled in last: the tensors' pieces are hashed on other threads
    while the written bytes go to disk (hashing while writing would slow the writes down on
    a small machine), so the check costs little more than the write. Returns the checksum.
    """
    at = header.index(b'"sha256":"' + _UNHASHED.encode()) + len(b'"sha256":"')
    views = [memoryview(t.view(-1).view(torch.uint8).numpy()) for t in tensors]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for part in (memoryview(header), *views):
                _write_all(fd, part)
            with ThreadPoolExecutor(1 + _HASHERS, thread_name_prefix="kvchunks-write") as helpers:
                synced = helpers.submit(os.fdatasync, fd)
                leaves = [
                    helpers.submit(_digest, view[start:end])
                    for view in views
                    for start, end in _pieces([(0, len(view))])
                ]
                digest = _root(leaf.result() for leaf in leaves)
                synced.result()
            os.pwrite(fd, digest.encode(), at)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def _sha256(parts: list[memoryview]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def remove_partial_files(data_dir: Path) -> int:
    """Delete the temporary files of writers killed before their rename (a live writer's
    stay: its pid, in the name, still runs). Returns how many were removed."""
    removed = 0
    for tmp in (Path(data_dir) / "kv").glob("*/.*.tmp"):
        pid = tmp.name.split(".")[-3]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ChunkFileError(f"chunk file {path} does not exist") from None
    except OSError as e:
        raise ChunkFileError(f"cannot read chunk file {path}: {e.strerror or e}") from e


def _parse(f: BinaryIO, size: int, path: Path) -> tuple[KVHeader, list[tuple[int, int]]]:
    """The checked header and the byte spans of `k` and `v` in the file."""

    def bad(problem: str) -> ChunkFileError:
        return ChunkFileError(f"chunk file {path} {problem}")

    if size < 8:
        raise bad(f"is truncated ({size} bytes)")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_HEADER_BYTES:
        raise bad(f"has a {length}-byte header (limit {MAX_HEADER_BYTES}): not a KV file")
    if 8 + length > size:
        raise bad(f"is truncated ({size} bytes, header alone needs {8 + length})")
    try:
        header = json.loads(f.read(length))
    except (ValueError, RecursionError) as e:
        raise bad(f"has an unreadable header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise bad("has an unreadable header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if not (isinstance(meta, dict) and all(isinstance(meta.get(k), str) for k in _META_KEYS)):
        raise bad("is not a kvchunks KV file (its metadata is missing or malformed)")
    if meta["format"] != FORMAT or meta["version"] not in READABLE_VERSIONS:
        raise bad(f"has format {meta['format'][:40]!r} version {meta['version'][:8]!r}")
    kv = _parse_meta(meta, bad)
    spans = _tensor_spans(header, kv, size - 8 - length, bad)
    return kv, [(8 + length + start, 8 + length + end) for start, end in spans]


def _parse_meta(meta: dict[str, str], bad: Callable[[str], ChunkFileError]) -> KVHeader:
    if not (is_hash(meta["fingerprint"]) and is_hash(meta["sha256"])):
        raise bad("has a malformed fingerprint or checksum")
    if meta["dtype"] not in DTYPES or meta["compression"] not in COMPRESSIONS:
        raise bad(
            f"has unknown dtype/compression {meta['dtype'][:20]!r}/{meta['compression'][:20]!r}"
        )
    parts = meta["shape"].split(",")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 12 for p in parts):
        raise bad(f"has a malformed shape {meta['shape'][:60]!r}")
    if 0 in map(int, parts):  # a chunk has at least one token; torch reads no empty span
        raise bad(f"holds no KV (shape {meta['shape']})")
    try:
        packed = base64.b64decode(meta["record"], validate=True)
    except (binascii.Error, ValueError):
        raise bad("has a malformed record (not base64)") from None
    if hashlib.sha256(packed).hexdigest() != meta["record_sha256"]:
        raise bad("is corrupted: its chunk record fails the SHA-256 check")
    try:
        record = unpack_record(packed)
        ChunkRecord.from_record(record)
    except InvalidInput as e:
        raise bad(f"has an invalid chunk record: {e}") from None
    shape = tuple(int(p) for p in parts)
    if record["token_count"] != shape[1]:
        raise bad(f"has a record of {record['token_count']} tokens but KV for {shape[1]}")
    return KVHeader(
        meta["version"],
        meta["fingerprint"],
        meta["dtype"],
        meta["compression"],
        shape,
        meta["sha256"],
        record,
    )


def _tensor_spans(
    header: dict[str, Any], kv: KVHeader, data_size: int, bad: Callable[[str], ChunkFileError]
) -> list[tuple[int, int]]:
    """Check the `k`/`v` entries against the metadata and the file size; their byte spans."""
    if sorted(header) != ["k", "v"]:
        raise bad(f"holds tensors {sorted(header)[:4]}, expected k and v")
    stored = _STORED[_DTYPE_NAMES[stored_dtype(TORCH_DTYPES[kv.dtype], kv.compression)]]
    count = kv.shape[0] * kv.shape[1] * kv.shape[2] * kv.shape[3]
    spans = []
    for name in ("k", "v"):
        entry = header[name]
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(entry, dict)
            and entry.get("dtype") == stored
            and entry.get("shape") == list(kv.shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and offsets[1] - offsets[0] == count * _ITEMSIZE[stored]
            and offsets[0] >= 0
        ):
            raise bad(f"has a '{name}' tensor that does not match its metadata")
        spans.append((offsets[0], offsets[1]))
    end = max(e for _, e in spans)
    if end > data_size:
        raise bad(f"is truncated ({data_size} of {end} KV bytes)")
    if end < data_size:
        raise bad(f"has {data_size - end} unexpected bytes after its KV")
    return spans


def _check_expected(
    kv: KVHeader,
    path: Path,
    fingerprint: str | None,
    dtype: str | torch.dtype | None,
    shape: tuple[int | None, ...] | None,
) -> None:
    if isinstance(dtype, torch.dtype):
        dtype = _DTYPE_NAMES.get(dtype, str(dtype))
    if dtype is not None and kv.dtype != dtype:  # first: the fingerprint differs too
        raise DtypeMismatch(f"chunk file {path}", kv.dtype, dtype)
    if fingerprint is not None and kv.fingerprint != fingerprint:
        raise ChunkFileError(
            f"chunk file {path} was computed by another model (fingerprint "
            f"{kv.fingerprint[:12]}, this model {fingerprint[:12]})"
        )
    if shape is not None and (
        len(shape) != 4
        or any(want not in (None, got) for want, got in zip(shape, kv.shape, strict=False))
    ):
        raise ChunkFileError(
            f"chunk file {path} has KV shape {kv.shape}, expected {tuple(shape)} "
            "(layers, tokens, kv_heads, head_dim)"
        )
