"""Content addressing: fixed digests, canonical bytes, no collisions by concatenation."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvchunks.common import InvalidInput
from kvchunks.engine import SamplingParams
from kvchunks.store.hashing import (
    chunk_hash,
    content_hash,
    context_hash,
    model_fingerprint,
    weights_digest,
)

A, B, C = "ab" * 32, "cd" * 32, "ef" * 32
FP = model_fingerprint("LlamaForCausalLM", A, "float32", 256, [])
token_lists = st.lists(st.integers(0, 2**31 - 1), max_size=20)


def test_known_inputs_give_fixed_digests():
    # Written down once: a change here means every stored chunk address changes (the last
    # one: the opening joined the model fingerprint, as all KV is now computed after it).
    assert FP == "44e0391832abe94eced8737ecff9e9ba7113dab52653cff270541cba3a63d0dc"
    assert context_hash([]) == "1af224fb48ac6cc531bc43d4bb963edf722a1bfe07dfae930666e5677905de02"
    ctx = context_hash([(B, 0), (C, 17)])
    assert ctx == "de016f15e04d0b00a0449ad7e4fdf049502285bbf7769f795f77363aa1d63b37"
    assert (
        chunk_hash(FP, ctx, 42, [1, 2, 3, 49151])
        == "f791774aebfe36a322bf6a7c006a4db94ea653ac1e6b50d9f34372909354bede"
    )
    assert (
        content_hash([1, 2, 3, 49151])
        == "b5c3e02d74bdefa673e32a6f88093ce4eb4468156d2770dc14007e3daf21098a"
    )


def _field(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def test_digests_follow_the_documented_canonical_bytes():
    tokens = [7, 0, 2**31 - 1]
    packed = struct.pack("<3i", *tokens)
    expected_content = hashlib.sha256(_field(b"kvchunks/content/v1") + _field(packed))
    assert content_hash(tokens) == expected_content.hexdigest()
    ctx = context_hash([])
    expected_chunk = hashlib.sha256(
        _field(b"kvchunks/chunk/v1")
        + _field(bytes.fromhex(FP))
        + _field(bytes.fromhex(ctx))
        + _field(struct.pack("<Q", 5))
        + _field(packed)
    )
    assert chunk_hash(FP, ctx, 5, tokens) == expected_chunk.hexdigest()


def test_every_input_of_a_chunk_hash_matters():
    ctx = context_hash([])
    base = chunk_hash(FP, ctx, 0, [1, 2, 3])
    other_model = model_fingerprint("LlamaForCausalLM", A, "bfloat16", 256, [])
    variants = {
        chunk_hash(other_model, ctx, 0, [1, 2, 3]),
        chunk_hash(FP, context_hash([(B, 0)]), 0, [1, 2, 3]),
        chunk_hash(FP, ctx, 1, [1, 2, 3]),
        chunk_hash(FP, ctx, 0, [1, 2, 4]),
        chunk_hash(FP, ctx, 0, [3, 2, 1]),
        chunk_hash(FP, ctx, 0, [1, 2]),
    }
    assert base not in variants and len(variants) == 6


def test_fields_are_separated_not_concatenated():
    # Moving a boundary between two string fields must change the fingerprint.
    assert model_fingerprint("ab", A, "c", 1, []) != model_fingerprint("a", A, "bc", 1, [])
    assert model_fingerprint("a", A, "b", 256, []) != model_fingerprint("a", A, "b", 257, [])
    # Every context starts with the opening, so it is part of the KV's identity.
    assert model_fingerprint("a", A, "b", 256, [1]) != model_fingerprint("a", A, "b", 256, [])
    # Parent order and positions are part of the context.
    assert context_hash([(B, 0), (C, 5)]) != context_hash([(C, 5), (B, 0)])
    assert context_hash([(B, 0), (C, 5)]) != context_hash([(B, 0), (C, 6)])
    # The same bytes hashed in different roles (domains) never coincide.
    assert content_hash([]) != context_hash([])


@given(token_lists, token_lists)
def test_different_token_lists_have_different_hashes(a, b):
    ctx = context_hash([])
    assert (content_hash(a) == content_hash(b)) == (a == b)
    assert (chunk_hash(FP, ctx, 0, a) == chunk_hash(FP, ctx, 0, b)) == (a == b)


def test_content_hash_ignores_context_and_position(make_cm):
    """The same question asked after a document and alone: two chunks (different context and
    position) with one content hash, by which the registry finds both."""
    after_doc, alone = make_cm("after-doc"), make_cm("alone")
    after_doc.activate_chunk(after_doc.add_chunk("The vault code is 4817.").hash)
    one = SamplingParams(temperature=0, max_tokens=1)
    prompts = [cm.generate("What is the code?", one).prompt_chunk for cm in (after_doc, alone)]
    assert prompts[0].hash != prompts[1].hash and prompts[0].position != prompts[1].position
    assert prompts[0].token_ids == prompts[1].token_ids
    shared = content_hash(prompts[0].token_ids)
    assert [p.content_hash for p in prompts] == [shared, shared]
    assert after_doc.registry.by_content(shared) == sorted(p.hash for p in prompts)


@pytest.mark.parametrize(
    "call",
    [
        lambda: content_hash([-1]),
        lambda: content_hash([2**31]),
        lambda: content_hash([1.0]),
        lambda: content_hash(["1"]),
        lambda: context_hash([("ab", 0)]),
        lambda: context_hash([(A.upper(), 0)]),
        lambda: context_hash([(A, -1)]),
        lambda: chunk_hash("not-hex", context_hash([]), 0, [1]),
        lambda: chunk_hash(FP, context_hash([]), -3, [1]),
        lambda: model_fingerprint("", A, "float32", 256, []),
        lambda: model_fingerprint("Llama", "abc", "float32", 256, []),
        lambda: model_fingerprint("Llama", A, "float32", 0, []),
    ],
)
def test_bad_inputs_are_refused(call):
    with pytest.raises(InvalidInput):
        call()


def test_weights_digest_streams_every_byte_in_name_order(tmp_path):
    big = bytes(range(256)) * (3 * 4096 + 7)  # > 3 MiB: several read buffers
    (tmp_path / "model-00001.safetensors").write_bytes(big)
    (tmp_path / "model-00002.safetensors").write_bytes(b"tail")
    paths = sorted(tmp_path.iterdir())
    digest = weights_digest(paths)
    assert digest == weights_digest(list(reversed(paths)))
    assert len(digest) == 64

    (tmp_path / "model-00001.safetensors").write_bytes(big[:-1] + b"\x00")
    assert weights_digest(paths) != digest  # the last byte of a large file counts


def test_weights_digest_frames_each_file(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"abc")
    second.write_bytes(b"def")
    split_one = weights_digest([first, second])
    first.write_bytes(b"ab")
    second.write_bytes(b"cdef")
    assert weights_digest([first, second]) != split_one


def test_weights_digest_refuses_missing_or_no_files(tmp_path):
    with pytest.raises(InvalidInput, match="cannot read weight file"):
        weights_digest([tmp_path / "absent.safetensors"])
    with pytest.raises(InvalidInput):
        weights_digest([])
