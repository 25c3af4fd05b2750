"""Small standalone chunks share the pool's blocks: capacity, exact answers, moves per chunk,
and eviction that frees blocks only when every chunk in them has gone."""

from __future__ import annotations

import math

import pytest
import torch
from reference import hf_logits

from kvchunks.common import CapacityError
from kvchunks.engine import SamplingParams
from kvchunks.policies.budgets import TierBudgets
from kvchunks.service.context_manager import ContextManager

DOC_A = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."
DOC_B = "Marie's favourite colour is teal, and she keeps three cats named Io, Europa and Callisto."


def note(i: int, n: int) -> str:
    """A note of exactly n tokens when added raw: 'note', a space, then n - 2 digits."""
    return f"note {i:0{n - 2}d}"


def kv_of(cm, chunk_hash):
    return cm.store.model.llm.read_kv(cm.store.composer.segments(cm.registry.get(chunk_hash)))


@pytest.mark.parametrize("n", [6, 20, 100])
def test_a_pool_holds_small_chunks_up_to_its_capacity(make_tiny_store, n):
    blocks = 2
    store = make_tiny_store(prefetch_policy="explicit", budgets=TierBudgets(gpu_blocks=blocks))
    cm = ContextManager(store=store)
    held = 0
    while True:
        chunk = cm.add_chunk(note(held, n), role="raw")
        assert chunk.token_count == n
        if store.stats["evictions"]:
            break
        held += 1
    capacity = blocks * 256 // n  # whole chunks of n tokens in the blocks' slots
    assert math.ceil(0.9 * blocks * 256 / n) <= held <= capacity


def test_a_packed_chunk_moves_alone_and_its_block_frees_with_the_last(make_tiny_store):
    store = make_tiny_store(prefetch_policy="explicit")
    cm = ContextManager(store=store)
    bm = store.model.llm.block_manager
    a, b, c = (cm.add_chunk(note(i, 20), role="raw") for i in range(3))
    assert [(s.blocks, s.start) for x in (a, b, c) for s in x.segments] == [
        (a.segments[0].blocks, 0),
        (a.segments[0].blocks, 20),
        (a.segments[0].blocks, 40),
    ]
    before = {x.hash: kv_of(cm, x.hash) for x in (a, b, c)}
    free = bm.num_free
    assert cm.move_to_cpu(b.hash).tier == "cpu"
    assert cm.get_chunk(a.hash).segments == a.segments  # the others stay where they are
    assert cm.get_chunk(c.hash).segments == c.segments
    assert bm.num_free == free  # a and c still hold the block
    cm.archive_to_disk(b.hash)
    moved = cm.move_to_gpu(b.hash)  # packed again, after c
    assert moved.segments[0].blocks == c.segments[0].blocks and moved.segments[0].start == 60
    for x in (a, b, c):
        k, v = kv_of(cm, x.hash)
        assert torch.equal(k, before[x.hash][0]) and torch.equal(v, before[x.hash][1])
    cm.move_to_cpu(a.hash)
    cm.move_to_cpu(c.hash)
    assert bm.num_free == free  # b's copy holds the block now
    cm.move_to_cpu(b.hash)
    assert bm.num_free == free + 1


def test_eviction_moves_the_fewest_coldest_chunks_that_free_a_block(make_tiny_store):
    store = make_tiny_store(prefetch_policy="explicit", budgets=TierBudgets(gpu_blocks=2))
    cm = ContextManager(store=store)
    # Five chunks of 100 tokens: c0, c1 in the first block, c2 across both, c3, c4 in the
    # second, whose last 12 slots are too few for another.
    c0, c1, c2, c3, c4 = (cm.add_chunk(note(i, 100), role="raw").hash for i in range(5))
    cm.move_to_gpu(c1)  # used again: c0, c2, c3, c4, c1 from coldest to most recent
    assert store.stats["evictions"] == 0
    c5 = cm.add_chunk(note(5, 100), role="raw").hash
    # c1 keeps the first block, so only c0 and c2 leaving cannot free one: the second block
    # frees when c2, c3 and c4 have all gone.
    assert set(store.tiers.kv) == {c1, c5} and set(store.host.kv) == {c0, c2, c3, c4}


def test_a_pool_that_cannot_free_a_block_moves_nothing(make_tiny_store):
    store = make_tiny_store(prefetch_policy="explicit", budgets=TierBudgets(gpu_blocks=1))
    cm = ContextManager(store=store)
    kept = cm.add_chunk(note(0, 100), role="raw")
    idle = cm.add_chunk(note(1, 100), role="raw")
    cm.activate_chunk(kept.hash)  # it holds the one block: nothing can free it
    with pytest.raises(CapacityError, match="gpu tier is full"):
        cm.add_chunk(note(2, 100), role="raw")
    assert set(store.tiers.kv) == {kept.hash, idle.hash} and not store.host.kv


def test_answers_over_packed_chunks_equal_the_reference(make_cm, hf_model):
    """Separately loaded chunks in `reuse`, packed one after another (the second and third
    start mid-block, the third runs into the next block), attend as the reference does with
    their own positions (all right after the opening) and a block-diagonal mask."""
    cm = make_cm()
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    c = cm.add_chunk(" ".join([DOC_A, DOC_B] * 5))
    chunks = [a, b, c]
    layout = [s for x in chunks for s in x.segments]
    assert layout[1].blocks[0] == layout[0].blocks[0] and layout[1].start == a.token_count
    assert layout[2].start > 0 and len(layout[2].blocks) == 2
    for x in chunks:
        cm.activate_chunk(x.hash)
    question = "What is the code of the vault?"
    store = cm.store
    ctx = store.composer.context_of(chunks, "reuse")
    q = store.model.chat.prompt(question)
    result = store.model.llm.prefill(q, ctx.segments, ctx.position, all_logits=True)
    store.tiers.free([result.segment])
    store.composer.release(ctx)
    opening = store.model.chat.opening
    ref = reuse_reference(hf_model, opening, chunks, q)[-len(q) :]
    assert (result.logits - ref).abs().max().item() <= 1e-4
    answer = cm.generate(question, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    expected: list[int] = []
    for _ in range(4):
        ref = reuse_reference(hf_model, opening, chunks, q + expected)
        expected.append(int(ref[-1].argmax()))
    assert answer.token_ids == expected


def reuse_reference(hf_model, opening: list[int], chunks, tail: list[int]) -> torch.Tensor:
    """HF logits of the opening, then the chunks' tokens, each chunk at positions right after
    the opening seeing only it and itself, then `tail` after the longest chunk, seeing
    everything before it."""
    o = len(opening)
    ids, positions, mask_spans = list(opening), list(range(o)), []
    for x in chunks:
        mask_spans.append((len(ids), len(ids) + x.token_count))
        ids += x.token_ids
        positions += range(o, o + x.token_count)
    end = o + max(x.token_count for x in chunks)
    positions += range(end, end + len(tail))
    ids += tail
    mask = torch.ones(len(ids), len(ids)).tril().bool()
    for start, stop in mask_spans:
        mask[start:stop, o:start] = False
    return hf_logits(hf_model, ids, mask=mask, position_ids=positions)


def test_a_packed_chunk_that_fails_leaves_its_tail_to_the_next(make_tiny_store, monkeypatch):
    cm = ContextManager(store=make_tiny_store(prefetch_policy="explicit"))
    first = cm.add_chunk(note(0, 20), role="raw")
    runner = cm.store.model.llm.runner
    run = runner.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cm.add_chunk(note(1, 20), role="raw")
    monkeypatch.setattr(runner, "run", run)
    after = cm.add_chunk(note(2, 20), role="raw")
    assert after.segments[0].blocks == first.segments[0].blocks
    assert after.segments[0].start == 20
