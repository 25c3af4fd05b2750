"""Attention filtered to a list of stored KV segments, against masked HF references."""

from __future__ import annotations

import dataclasses

import torch
from reference import hf_greedy, hf_logits
from test_engine_reference import random_tokens

from kvchunks.engine import SamplingParams


def visible_mask(n: int, hidden: range, queries: range) -> torch.Tensor:
    """Causal mask over n tokens in which `queries` cannot see the `hidden` tokens."""
    mask = torch.ones(n, n).tril().bool()
    for q in queries:
        mask[q, hidden.start : hidden.stop] = False
    return mask


def test_timeline_continuation_equals_one_forward(llm, hf_model):
    a, b, c = random_tokens(300, 1), random_tokens(200, 2), random_tokens(40, 3)
    ra = llm.prefill(a)
    rb = llm.prefill(b, context=[ra.segment], continue_after=ra.segment)
    assert rb.segment.start == 300 % 256 and rb.segment.blocks[0] == ra.segment.blocks[-1]
    rc = llm.prefill(c, context=[ra.segment, rb.segment], all_logits=True)
    ref = hf_logits(hf_model, a + b + c)[500:]
    for r in (ra, rb, rc):
        llm.release(r.segment)
    assert (rc.logits - ref).abs().max().item() <= 1e-4


def test_hidden_middle_segment_equals_masked_reference(llm, hf_model):
    a, b, c = random_tokens(300, 4), random_tokens(120, 5), random_tokens(30, 6)
    ra = llm.prefill(a)
    rb = llm.prefill(b, context=[ra.segment])
    # b is filtered out: c sees only a, at the positions of the full timeline.
    rc = llm.prefill(c, context=[ra.segment], position=420, all_logits=True)
    mask = visible_mask(450, hidden=range(300, 420), queries=range(420, 450))
    ref = hf_logits(hf_model, a + b + c, mask=mask)[420:]
    for r in (ra, rb, rc):
        llm.release(r.segment)
    assert (rc.logits - ref).abs().max().item() <= 1e-4


def test_sub_segments_hide_tokens_inside_a_block(llm, hf_model):
    a, c = random_tokens(400, 7), random_tokens(20, 8)
    ra = llm.prefill(a)
    bs = llm.config.block_size
    keep = [ra.segment.sub(0, 100, bs), ra.segment.sub(150, 250, bs)]
    rc = llm.prefill(c, context=keep, position=400, all_logits=True)
    ref = hf_logits(hf_model, a + c, mask=visible_mask(420, range(100, 150), range(400, 420)))
    llm.release(ra.segment)
    llm.release(rc.segment)
    assert (rc.logits - ref[400:]).abs().max().item() <= 1e-4


def test_shifted_segments_equal_block_diagonal_reference(llm, hf_model):
    """Two standalone chunks re-placed at contiguous positions by rotating their keys."""
    a, b, q = random_tokens(100, 9), random_tokens(80, 10), random_tokens(25, 11)
    ra, rb = llm.prefill(a, position=0), llm.prefill(b, position=0)
    shifted_b = dataclasses.replace(rb.segment, shift=100)
    rq = llm.prefill(q, context=[ra.segment, shifted_b], position=180, all_logits=True)
    mask = visible_mask(205, hidden=range(0, 100), queries=range(100, 180))
    ref = hf_logits(hf_model, a + b + q, mask=mask)[180:]
    for r in (ra, rb, rq):
        llm.release(r.segment)
    assert (rq.logits - ref).abs().max().item() <= 1e-4


def test_generation_against_segments_equals_plain_generation(llm):
    """Decoding with stored context (paged, filtered path) equals decoding the full prompt."""
    doc, question = random_tokens(270, 12), random_tokens(15, 13)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([doc + question], params)[0].token_ids
    rd = llm.prefill(doc)
    seqs = [llm.add_request(question, params, context=[rd.segment]) for _ in range(3)]
    while not all(s.is_finished for s in seqs):
        llm.step()
    llm.release(rd.segment)
    assert all(s.completion_token_ids == expected for s in seqs)


def test_keep_kv_returns_the_answer_kv(llm):
    prompt = random_tokens(40, 14)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seq = llm.add_request(prompt, params, keep_kv=True)
    tokens = list(llm.stream(seq))
    segment = seq.own_segment()
    assert segment.length == 50 and len(tokens) == 10
    k, v = llm.read_kv([segment])
    fresh = llm.prefill(prompt + tokens)
    k2, v2 = llm.read_kv([fresh.segment])
    llm.release(segment)
    llm.release(fresh.segment)
    torch.testing.assert_close(k, k2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v, v2, atol=1e-4, rtol=1e-4)


def test_kv_reads_and_writes_copy_exactly_the_segments_slots(llm):
    bm = llm.block_manager
    a = llm.prefill(random_tokens(300, 21))
    b = llm.prefill(random_tokens(230, 22), context=[a.segment], continue_after=a.segment)
    made = [a.segment, b.segment]
    try:
        assert b.segment.start == 300 % 256  # b begins mid-block
        segments = [b.segment.sub(7, 220, 256), a.segment.sub(250, 50, 256)]
        slots = torch.cat([llm.runner.segment_slots(s) for s in segments])
        pool = llm.runner.kv_cache.flatten(2, 3)
        k, v = llm.read_kv(segments)
        assert torch.equal(k, pool[0].index_select(1, slots))
        assert torch.equal(v, pool[1].index_select(1, slots))
        # The next two blocks handed out are not adjacent in the pool.
        first = bm.free_ids[-1]
        second = next(x for x in bm.free_ids if x not in (first, first + 1))
        bm.free_ids.remove(second)
        bm.free_ids.insert(len(bm.free_ids) - 1, second)
        made.append(llm.write_kv(k, v, position=0))
        assert made[-1].blocks == (first, second) and len(made[-1].slot_runs(256)) == 2
        k2, v2 = llm.read_kv([made[-1]])
        assert torch.equal(k2, k) and torch.equal(v2, v)
        assert torch.equal(pool[0].index_select(1, llm.runner.segment_slots(made[-1])), k)
    finally:
        for s in made:
            llm.release(s)


def test_placed_copy_attends_bitwise_like_shifted_segments(llm):
    """`place` rotates keys once into a copy; attending to the copy is the same arithmetic as
    re-rotating the stored keys at every attention."""
    a, b, q = random_tokens(100, 31), random_tokens(300, 32), random_tokens(20, 33)
    ra, rb = llm.prefill(a, position=0), llm.prefill(b, position=0)
    placed = llm.place([rb.segment], position=100)
    shifted = llm.prefill(q, [ra.segment, dataclasses.replace(rb.segment, shift=100)], 400, True)
    copied = llm.prefill(q, [ra.segment, placed], 400, all_logits=True)
    for s in (ra.segment, rb.segment, placed, shifted.segment, copied.segment):
        llm.release(s)
    assert placed.position == 100 and placed.length == 300
    assert torch.equal(copied.logits, shifted.logits)


def test_recompute_of_every_token_equals_one_forward(llm, hf_model):
    """Selective recompute of all tokens of a placed chunk is a full prefill in that context."""
    a, b, q = random_tokens(150, 34), random_tokens(280, 35), random_tokens(20, 36)
    ra, rb = llm.prefill(a), llm.prefill(b, position=0)
    placed = llm.place([rb.segment], position=150)
    llm.recompute(placed, b, list(range(len(b))), [ra.segment])
    rq = llm.prefill(q, [ra.segment, placed], 430, all_logits=True)
    fresh = llm.prefill(b, [ra.segment])
    k, v = llm.read_kv([placed])
    k_ref, v_ref = llm.read_kv([fresh.segment])
    for s in (ra.segment, rb.segment, placed, rq.segment, fresh.segment):
        llm.release(s)
    assert (rq.logits - hf_logits(hf_model, a + b + q)[430:]).abs().max().item() <= 1e-4
    torch.testing.assert_close(k, k_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v, v_ref, atol=1e-4, rtol=1e-4)


def test_recompute_changes_only_the_chosen_tokens(llm):
    a, b = random_tokens(60, 37), random_tokens(90, 38)
    ra, rb = llm.prefill(a), llm.prefill(b, position=0)
    placed = llm.place([rb.segment], position=60)
    k0, v0 = llm.read_kv([placed])
    chosen = [0, 1, 2, 40, 89]
    llm.recompute(placed, b, chosen, [ra.segment])
    k1, v1 = llm.read_kv([placed])
    for s in (ra.segment, rb.segment, placed):
        llm.release(s)
    moved = ((k1 != k0).flatten(2).any(-1) | (v1 != v0).flatten(2).any(-1)).any(0)
    assert moved.nonzero().flatten().tolist() == chosen


def test_batch_mixing_shifted_and_plain_sequences_decodes_like_hf(llm, hf_model):
    check_shifted_and_plain_batch(llm, hf_model)


def check_shifted_and_plain_batch(llm, hf_model) -> None:
    """Greedy decode of three sequences in one batch: chunks re-placed by shifted keys,
    a hidden middle segment, and plain stored context, each against an HF step loop."""
    a, b, c = random_tokens(90, 41), random_tokens(70, 42), random_tokens(50, 43)
    q = random_tokens(12, 44)
    ra, rb = llm.prefill(a), llm.prefill(b, position=0)
    rc = llm.prefill(c, context=[ra.segment])  # a then c: one timeline at 0..139
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    shifted = [ra.segment, dataclasses.replace(rb.segment, shift=90)]
    seqs = [
        llm.add_request(q, params, shifted, position=160),
        llm.add_request(q, params, [ra.segment], position=140),  # c hidden
        llm.add_request(q, params, [ra.segment, rc.segment]),
    ]
    while not all(s.is_finished for s in seqs):
        llm.step()
    for r in (ra, rb, rc):
        llm.release(r.segment)
    expected = [
        hf_greedy(hf_model, a + b + q, 10, blocks=((90, 160),)),
        hf_greedy(hf_model, a + c + q, 10, hidden=range(90, 140), hidden_from=140),
        hf_greedy(hf_model, a + c + q, 10),
    ]
    assert [s.completion_token_ids for s in seqs] == expected
