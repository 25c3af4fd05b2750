"""Rewriting chunk files the way a damaged disk or an attacker would (for the tests)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import msgpack


def raw_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict | bytes, body: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def with_record(path: Path, record: object) -> None:
    """Rewrite the file's record (with a matching record checksum, as an attacker would)."""
    header, body = raw_header(path)
    packed = record if isinstance(record, bytes) else msgpack.packb(record)
    header["__metadata__"]["record"] = base64.b64encode(packed).decode()
    header["__metadata__"]["record_sha256"] = hashlib.sha256(packed).hexdigest()
    write_raw(path, header, body)
