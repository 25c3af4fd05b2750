"""Chunked prefill: a prompt longer than a step's token budget is computed in pieces, while
running answers keep getting a token every step."""

from __future__ import annotations

import threading

import pytest
import torch
from reference import hf_generate, hf_logits
from test_engine_reference import random_tokens

from kvchunks.common import InvalidInput
from kvchunks.engine import EngineConfig, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def budget(llm, monkeypatch):
    """Set the shared engine's step budget for one test."""

    def set_budget(tokens: int) -> None:
        monkeypatch.setattr(llm.scheduler, "max_num_batched_tokens", tokens)

    return set_budget


def run_logging_pieces(llm, seq) -> list[int]:
    """Step until seq finishes; the tokens each step computed of it."""
    pieces = []
    while not seq.is_finished:
        llm.step()
        pieces.append(seq.num_scheduled)
    return pieces


def test_a_prompt_in_pieces_over_stored_kv_answers_as_hf(llm, hf_model, budget):
    """Pieces that start and end inside blocks (256 tokens), after a stored segment."""
    budget(100)
    stored_tokens, prompt = random_tokens(150, seed=61), random_tokens(260, seed=62)
    stored = llm.prefill(stored_tokens).segment
    free_before = llm.block_manager.num_free
    try:
        seq = llm.add_request(prompt, GREEDY, [stored])
        pieces = run_logging_pieces(llm, seq)
    finally:
        llm.release(stored)
    assert pieces == [100, 100, 60] + [1] * 7  # the prompt in three steps, then decoding
    assert seq.completion_token_ids == hf_generate(hf_model, stored_tokens + prompt, 8)
    assert llm.block_manager.num_free == free_before + len(stored.blocks)


def test_running_answers_get_a_token_every_step_while_a_long_prompt_is_read(llm, budget):
    prompts = [random_tokens(n, seed=70 + n) for n in (20, 45, 400)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    budget(64)
    short = [llm.add_request(p, params) for p in prompts[:2]]
    llm.step()  # both short prompts: 65 tokens, one more than a step's 64
    llm.step()
    assert [s.num_completion_tokens for s in short] == [2, 1]
    long = llm.add_request(prompts[2], params)
    steps = 0
    while not long.num_completion_tokens:
        before = [s.num_tokens for s in short]
        llm.step()
        steps += 1
        assert [s.num_tokens for s in short] == [n + 1 for n in before]
        assert long.num_scheduled <= 64 - len(short)
    assert steps == -(-400 // 62)  # the budget left after the two answers' tokens
    while not llm.scheduler.is_finished():
        llm.step()
    assert [s.completion_token_ids for s in [*short, long]] == alone


def test_seeded_sampling_does_not_depend_on_how_the_prompt_is_cut(llm, budget):
    """A prompt's pieces before its last sample nothing: a seed's draws stay the same."""
    prompts = [random_tokens(n, seed=80 + n) for n in (300, 30)]
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=5, ignore_eos=True)
    whole = [o.token_ids for o in llm.generate(prompts, seeded)]
    budget(64)
    assert [o.token_ids for o in llm.generate(prompts, seeded)] == whole


def test_a_prompt_stopped_between_pieces_keeps_the_kv_of_its_pieces(llm, budget):
    budget(64)
    prompt = random_tokens(300, seed=90)
    free_before = llm.block_manager.num_free
    seq = llm.add_request(prompt, GREEDY, keep_kv=True)
    llm.step()
    llm.step()
    llm.abort(seq)
    kept = seq.own_segment()
    assert kept.length == 128 and not seq.completion_token_ids
    whole = llm.prefill(prompt[:128]).segment
    try:
        for piece, at_once in zip(llm.read_kv([kept]), llm.read_kv([whole]), strict=True):
            assert torch.allclose(piece, at_once, atol=1e-5)
    finally:
        llm.release(whole)
        llm.release(kept)
    assert llm.block_manager.num_free == free_before


def test_stored_kv_is_computed_in_pieces_with_the_running_answers_stepped_between(
    llm, hf_model, budget
):
    prompt, document = random_tokens(20, seed=91), random_tokens(300, seed=92)
    alone = llm.generate([prompt], GREEDY)[0].token_ids
    budget(64)
    seq = llm.add_request(prompt, GREEDY)
    llm.step()
    result = llm.prefill(document, all_logits=True)
    try:
        # Logits within 1e-3 of HF's: pieces of 64 tokens sum in another order than one pass.
        assert (result.logits - hf_logits(hf_model, document)).abs().max().item() <= 1e-3
    finally:
        llm.release(result.segment)
    assert seq.num_completion_tokens == 1 + 4  # a step between each two of the 5 pieces
    while not seq.is_finished:
        llm.step()
    assert seq.completion_token_ids == alone


def test_a_recompute_in_pieces_equals_one_pass_with_the_running_answers_stepped_between(
    llm, budget
):
    first, second = random_tokens(100, seed=97), random_tokens(300, seed=98)
    stored = llm.prefill(first).segment
    chosen = list(range(0, 300, 2))  # 150 tokens: three pieces of at most 64
    kv, stepped = [], []
    for tokens_per_step in (1000, 64):
        budget(tokens_per_step)
        target = llm.prefill(second, position=100).segment  # computed without `first`
        seq = llm.add_request(random_tokens(20, seed=99), GREEDY)
        llm.step()
        as_stored = llm.read_kv([target])[0]
        llm.recompute(target, second, chosen, [stored])
        stepped.append(seq.num_completion_tokens - 1)
        kv.append(llm.read_kv([target]))
        assert not torch.allclose(kv[-1][0], as_stored, atol=1e-3)  # it did recompute
        llm.abort(seq)
        llm.release(target)
    llm.release(stored)
    assert stepped == [0, 2]
    for one_pass, pieces in zip(*kv, strict=True):
        assert torch.allclose(one_pass, pieces, atol=1e-5)


def test_an_answer_streams_while_another_thread_computes_stored_kv(llm, budget):
    """The answer's thread waits for the lock the whole time: the tokens the other thread's
    steps give it are passed on all the same."""
    budget(64)
    lock = threading.RLock()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seq = llm.add_request(random_tokens(20, seed=93), params)
    streamed = threading.Event()

    def answer() -> None:
        for _ in llm.steps(seq, lock):
            streamed.set()

    waited = []

    def wait_for_the_stream(_done: int, _layers: int) -> None:
        if seq.num_completion_tokens and not waited:  # a step between pieces gave it one
            waited.append(streamed.wait(timeout=30))

    thread = threading.Thread(target=answer)
    with lock:
        thread.start()
        with llm.layer_progress(wait_for_the_stream):
            llm.release(llm.prefill(random_tokens(400, seed=94)).segment)
        assert streamed.is_set()
    thread.join(timeout=60)
    assert seq.is_finished and seq.num_completion_tokens == 20


def test_the_step_budget_holds_every_running_answers_token():
    assert EngineConfig(device="cpu").max_num_batched_tokens == 512
    assert EngineConfig(device="cuda").max_num_batched_tokens == 2048
    with pytest.raises(InvalidInput, match="max_num_seqs"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)
