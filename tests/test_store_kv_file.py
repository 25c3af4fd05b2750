"""KV files: bitwise round trip, every kind of damage refused with one line, never unpickled."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import msgpack
import pytest
import safetensors
import torch
from kv_files import raw_header, with_record, write_raw

from kvchunks.common import ChunkFileError, InvalidInput
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.hashing import chunk_hash, content_hash, context_hash, model_fingerprint
from kvchunks.store.kv_file import kv_path, read_kv_file, read_kv_header, write_kv_file

FP = model_fingerprint("LlamaForCausalLM", "ab" * 32, "float32", 256, [])
OTHER_FP = model_fingerprint("LlamaForCausalLM", "cd" * 32, "float32", 256, [])
SHAPE = (3, 5, 2, 8)  # layers, tokens, kv heads, head dim


def make_record(tokens: int = SHAPE[1]) -> dict:
    ids = list(range(100, 100 + tokens))
    chunk = ChunkInfo(
        hash=chunk_hash(FP, context_hash([]), 0, ids),
        content_hash=content_hash(ids),
        token_ids=ids,
        role="user",
        text="some text",
        metadata={"source": "doc.txt"},
        tags=["t1"],
    )
    return chunk.to_record()


def piece_tree_sha256(*tensors: torch.Tensor, piece: int = 1 << 20) -> str:
    """The version 2 checksum, from its definition: SHA-256 over the SHA-256 of each 1 MiB
    piece of k's bytes, then of v's."""
    leaves = b""
    for t in tensors:
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        leaves += b"".join(
            hashlib.sha256(data[at : at + piece]).digest() for at in range(0, len(data), piece)
        )
    return hashlib.sha256(leaves).hexdigest()


def make_kv(dtype: torch.dtype = torch.float32, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return k, v


@pytest.fixture
def kv_file(tmp_path: Path) -> Path:
    path = tmp_path / "chunk.safetensors"
    write_kv_file(path, *make_kv(), make_record(), FP)
    return path


def _raises_one_line(path: Path, match: str, **expect) -> ChunkFileError:
    with pytest.raises(ChunkFileError, match=match) as info:
        read_kv_file(path, **expect)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bitwise(tmp_path, dtype):
    k, v = make_kv(dtype)
    record = make_record()
    path = kv_path(tmp_path, record["hash"])
    written = write_kv_file(path, k, v, record, FP)
    k2, v2, record2, header = read_kv_file(
        path, expect_fingerprint=FP, expect_dtype=dtype, expect_shape=SHAPE
    )
    assert k2.dtype == dtype and v2.dtype == dtype
    assert torch.equal(k2.view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(v2.view(torch.uint8), v.view(torch.uint8))
    assert record2 == record and ChunkInfo.from_record(record2) == ChunkInfo.from_record(record)
    assert header == written and header.shape == SHAPE and header.compression == "none"
    # A plain safetensors file: the library reads the same tensors and the filled-in checksum.
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata()["sha256"] == written.sha256
        assert all(
            torch.equal(f.get_tensor(n).view(torch.uint8), t.view(torch.uint8))
            for n, t in (("k", k), ("v", v))
        )
    assert piece_tree_sha256(k, v) == written.sha256
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0  # aligned tensor bytes


def test_canonical_location(tmp_path):
    h = "0f" * 32
    assert kv_path(tmp_path, h) == tmp_path / "kv" / "0f" / f"{h}.safetensors"
    with pytest.raises(InvalidInput):
        kv_path(tmp_path, "../../etc/passwd")


def test_bf16_compression_is_declared_and_cast_back(tmp_path):
    k, v = make_kv(torch.float32)
    plain, small = tmp_path / "plain.safetensors", tmp_path / "small.safetensors"
    write_kv_file(plain, k, v, make_record(), FP)
    write_kv_file(small, k, v, make_record(), FP, compression="bf16")
    k2, v2, _, header = read_kv_file(small, expect_dtype="float32")
    assert header.compression == "bf16" and header.dtype == "float32"
    assert k2.dtype == torch.float32
    assert torch.equal(k2, k.to(torch.bfloat16).to(torch.float32))
    assert torch.equal(v2, v.to(torch.bfloat16).to(torch.float32))
    assert small.stat().st_size < plain.stat().st_size
    with pytest.raises(InvalidInput):
        write_kv_file(tmp_path / "x.safetensors", k, v, make_record(), FP, compression="zip")


def test_header_is_read_without_the_kv(kv_file):
    header = read_kv_header(kv_file)
    assert header.fingerprint == FP and header.dtype == "float32" and header.shape == SHAPE
    assert header.record["token_ids"] == make_record()["token_ids"]


def test_missing_file(tmp_path):
    _raises_one_line(tmp_path / "absent.safetensors", "does not exist")


@pytest.mark.parametrize("keep", [0, 4, 8, 40, -1, -100])
def test_truncated_file(kv_file, keep):
    data = kv_file.read_bytes()
    kv_file.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    _raises_one_line(kv_file, "truncated")


def test_flipped_kv_byte_fails_the_checksum(kv_file):
    data = bytearray(kv_file.read_bytes())
    data[-3] ^= 0x01
    kv_file.write_bytes(bytes(data))
    _raises_one_line(kv_file, "SHA-256")
    assert read_kv_header(kv_file).fingerprint == FP  # the header alone is still fine


BIG_SHAPE = (2, 2100, 2, 64)  # 2.05 MiB per tensor: three pieces each, the last one short


def test_checksum_covers_every_piece_of_a_large_chunk(tmp_path):
    k, v = make_kv(shape=BIG_SHAPE)
    record = make_record(BIG_SHAPE[1])
    path = tmp_path / "big.safetensors"
    written = write_kv_file(path, k, v, record, FP)
    assert written.sha256 == piece_tree_sha256(k, v) != piece_tree_sha256(v, k)
    k2, v2, _, _ = read_kv_file(path, FP)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    header, body = raw_header(path)
    pieces = [0, 1 << 20, k.nbytes - 1, k.nbytes, len(body) - 1]  # k's first, k's last, v's
    for at in pieces:
        damaged = bytearray(body)
        damaged[at] ^= 0x80
        write_raw(path, header, bytes(damaged))
        _raises_one_line(path, "SHA-256")
    swapped = body[1 << 20 : 2 << 20] + body[: 1 << 20] + body[2 << 20 :]  # same leaves
    write_raw(path, header, swapped)
    _raises_one_line(path, "SHA-256")


def test_version_1_files_are_still_read(tmp_path):
    """Version 1 checked one SHA-256 over k's bytes then v's; such files load as before."""
    k, v = make_kv(shape=BIG_SHAPE)
    path = tmp_path / "old.safetensors"
    write_kv_file(path, k, v, make_record(BIG_SHAPE[1]), FP)
    header, body = raw_header(path)
    header["__metadata__"] |= {"version": "1", "sha256": hashlib.sha256(body).hexdigest()}
    write_raw(path, header, body)
    k2, v2, _, read = read_kv_file(path, FP)
    assert read.version == "1" and torch.equal(k2, k) and torch.equal(v2, v)
    header["__metadata__"]["sha256"] = piece_tree_sha256(k, v)  # version 2's sum: refused
    write_raw(path, header, body)
    _raises_one_line(path, "SHA-256")


def test_flipped_record_byte_fails_the_record_checksum(kv_file):
    header, body = raw_header(kv_file)
    record = base64.b64decode(header["__metadata__"]["record"])
    flipped = bytearray(record)
    flipped[len(flipped) // 2] ^= 0x01
    header["__metadata__"]["record"] = base64.b64encode(bytes(flipped)).decode()
    write_raw(kv_file, header, body)
    _raises_one_line(kv_file, "record fails the SHA-256")


def test_trailing_bytes_are_refused(kv_file):
    kv_file.write_bytes(kv_file.read_bytes() + b"\x00" * 16)
    _raises_one_line(kv_file, "unexpected bytes")


def test_other_model_dtype_or_shape_is_refused(kv_file):
    _raises_one_line(kv_file, "another model", expect_fingerprint=OTHER_FP)
    _raises_one_line(
        kv_file,
        "computed in float32 and this model runs in bfloat16; run with --dtype float32",
        expect_dtype=torch.bfloat16,
    )
    # A file of another dtype names the dtypes, not "another model", though both differ.
    _raises_one_line(
        kv_file, "computed in float32", expect_fingerprint=OTHER_FP, expect_dtype="float16"
    )
    _raises_one_line(kv_file, "expected", expect_shape=(3, None, 4, 8))
    _raises_one_line(kv_file, "expected", expect_shape=(3, 5, 2))
    k, _, _, _ = read_kv_file(kv_file, expect_shape=(3, None, 2, 8))  # None: any length
    assert tuple(k.shape) == SHAPE


def test_a_sound_file_of_another_chunk_is_refused(kv_file):
    """A file copied or restored to another chunk's path is not read as that chunk's KV."""
    own = make_record()["hash"]
    other = make_record(tokens=4)["hash"]
    _raises_one_line(kv_file, f"holds chunk {own[:12]}, not {other[:12]}", expect_hash=other)
    assert read_kv_file(kv_file, expect_hash=own)[2]["hash"] == own


def test_an_empty_kv_is_not_written(tmp_path):
    path = tmp_path / "empty.safetensors"
    with pytest.raises(InvalidInput, match="no KV to write"):
        write_kv_file(path, *make_kv(shape=(3, 0, 2, 8)), make_record(tokens=0), FP)
    assert not path.exists()


def test_huge_header_length_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _raises_one_line(path, "header")


@pytest.mark.parametrize(
    "header",
    [
        b"not json at all",
        b"[1, 2, 3]",
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        json.dumps({"k": {}, "v": {}}).encode(),  # no metadata
        json.dumps({"__metadata__": "x", "k": {}, "v": {}}).encode(),
    ],
)
def test_malformed_header_json(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, b"")
    _raises_one_line(path, "header|metadata")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("shape", 5, "metadata"),  # not a string
        ("shape", "3,5,2", "shape"),
        ("shape", "3,5,2,٣", "shape"),  # a non-ASCII digit
        ("shape", "3,999999999999999,2,8", "shape"),
        ("dtype", "int8", "dtype"),
        ("compression", "zstd", "compression"),
        ("fingerprint", "zz", "fingerprint"),
        ("format", "something-else", "format"),
        ("version", "3", "version"),  # from a newer kvchunks
        ("record", "!!!not base64!!!", "base64"),
        ("shape", "3,0,2,8", "holds no KV"),  # torch would raise its own error on it
    ],
)
def test_hostile_metadata_values(kv_file, key, value, match):
    header, body = raw_header(kv_file)
    header["__metadata__"][key] = value
    write_raw(kv_file, header, body)
    _raises_one_line(kv_file, match)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.update(token_ids="abc"),
        lambda r: r.update(token_ids=[1, 2, 3, 4, -5]),
        lambda r: r.update(tags=[{"x": 1}]),
        lambda r: r.update(role="root"),
        lambda r: r.update(sources=[["a" * 64, 0, -2]]),
        lambda r: r.pop("hash"),
        lambda r: r.update(version=99),
        lambda r: r.update(token_ids=list(range(7)), token_count=7),  # 7 tokens, KV for 5
    ],
)
def test_hostile_record_fields(kv_file, mutate):
    record = make_record()
    mutate(record)
    with_record(kv_file, record)
    _raises_one_line(kv_file, "record")


def test_hostile_msgpack_record(kv_file):
    for packed in (b"\x91" * 100_000 + b"\xc0", b"\xc1", msgpack.packb([1, 2]), b"\xdb\xff\xff"):
        with_record(kv_file, packed)
        _raises_one_line(kv_file, "record")


def test_tensor_table_must_match_metadata(kv_file):
    header, body = raw_header(kv_file)
    header["k"]["dtype"] = "F16"
    write_raw(kv_file, header, body)
    _raises_one_line(kv_file, "'k' tensor")
    header["k"]["dtype"] = "F32"
    header["extra"] = header["v"]
    write_raw(kv_file, header, body)
    _raises_one_line(kv_file, "expected k and v")


class _Planted:
    """Unpickling this creates a marker file: proof that a reader executed pickle."""

    marker: Path

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_planted_pickle_in_the_record_is_never_executed(kv_file, tmp_path):
    evil = _Planted()
    evil.marker = tmp_path / "pwned"
    with_record(kv_file, pickle.dumps(evil))
    _raises_one_line(kv_file, "record")
    with pytest.raises(ChunkFileError):
        read_kv_header(kv_file)
    assert not evil.marker.exists()


def test_a_torch_pickle_file_is_never_executed(tmp_path):
    evil = _Planted()
    evil.marker = tmp_path / "pwned"
    path = tmp_path / "chunk.safetensors"
    torch.save({"k": evil}, path)
    with pytest.raises(ChunkFileError):
        read_kv_file(path)
    assert not evil.marker.exists()


def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "chunk.safetensors"
    target.mkdir()  # the final rename fails after the data was written to a temp file
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_kv_file(target, *make_kv(), make_record(), FP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk.safetensors"]
    assert (target / "keep").read_text() == "x"


def test_refused_write_keeps_the_old_file(kv_file):
    before = kv_file.read_bytes()
    k, v = make_kv()
    with pytest.raises(InvalidInput):
        write_kv_file(kv_file, k, v, make_record(tokens=4), FP)  # record says 4 tokens, KV 5
    with pytest.raises(InvalidInput):
        write_kv_file(kv_file, k, v[:, :4], make_record(), FP)
    with pytest.raises(InvalidInput):
        write_kv_file(kv_file, k.to(torch.int32), v.to(torch.int32), make_record(), FP)
    assert kv_file.read_bytes() == before
    assert [p.name for p in kv_file.parent.iterdir()] == [kv_file.name]


def test_overwrite_replaces_the_whole_file(kv_file):
    k, v = make_kv(torch.bfloat16)
    write_kv_file(kv_file, k, v, make_record(), OTHER_FP)
    k2, _, _, header = read_kv_file(kv_file, expect_fingerprint=OTHER_FP)
    assert header.dtype == "bfloat16" and torch.equal(k2, k)


def test_v_stored_before_k_and_read_in_small_steps_verifies(kv_file, monkeypatch):
    from kvchunks.store import kv_file as module

    header, body = raw_header(kv_file)
    (k0, k1), (v0, v1) = header["k"]["data_offsets"], header["v"]["data_offsets"]
    header["v"]["data_offsets"] = [0, v1 - v0]  # a valid safetensors layout, v's bytes first
    header["k"]["data_offsets"] = [v1 - v0, v1 - v0 + k1 - k0]
    write_raw(kv_file, header, body[v0:v1] + body[k0:k1])
    monkeypatch.setattr(module, "_READ_STEP", 100)  # the checksum is taken over many reads
    k, v, _, _ = read_kv_file(kv_file, expect_fingerprint=FP)
    want_k, want_v = make_kv()
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
