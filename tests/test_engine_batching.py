"""Continuous batching, preemption, sampling and block accounting."""

from __future__ import annotations

import threading

import pytest
from test_engine_reference import random_tokens

from kvchunks.common import CapacityError, InvalidInput
from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.engine import llm as llm_module
from kvchunks.engine.block_manager import BlockManager

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def prompts_of_lengths(lengths):
    return [random_tokens(n, seed=100 + n) for n in lengths]


def test_batched_equals_one_at_a_time(llm):
    # More than one decode group (of 8), with lengths around block boundaries.
    prompts = prompts_of_lengths([3, 17, 64, 100, 255, 256, 300, 511, 40, 41, 128, 7])
    free_before = llm.block_manager.num_free
    batched = llm.generate(prompts, GREEDY)
    single = [llm.generate([p], GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    assert all(len(o.token_ids) == 16 for o in batched)
    assert llm.block_manager.num_free == free_before


def test_preemption_under_a_small_pool_gives_the_same_answers(model_path, llm):
    small = LLM(model_path, EngineConfig(num_blocks=6, block_size=16))
    small.runner.model = llm.runner.model  # same weights, a tiny pool
    prompts = prompts_of_lengths([20, 30, 25, 40])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert [o.token_ids for o in small.generate(prompts, params)] == expected
    assert small.scheduler.num_preemptions > 0
    assert small.block_manager.num_free == 6


def test_request_larger_than_the_pool_is_refused(model_path, llm):
    small = LLM(model_path, EngineConfig(num_blocks=2, block_size=16))
    with pytest.raises(CapacityError):
        small.generate([random_tokens(40, seed=1)], GREEDY)
    assert small.block_manager.num_free == 2


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llm):
    ids = random_tokens(30, seed=3)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=12, seed=11)
    a, b = llm.generate([ids, ids], seeded)
    assert a.token_ids == b.token_ids
    other = llm.generate([ids], SamplingParams(temperature=1.5, max_tokens=12, seed=12))[0]
    assert other.token_ids != a.token_ids
    top1 = SamplingParams(temperature=0.7, top_k=1, max_tokens=12, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert llm.generate([ids], top1)[0].token_ids == llm.generate([ids], greedy)[0].token_ids


def test_stop_tokens_and_max_tokens(llm):
    ids = random_tokens(20, seed=4)
    free = llm.generate([ids], GREEDY)[0].token_ids
    stop = free[5]
    first = free.index(stop)
    for ignore_eos in (False, True):  # which leaves the tokens a request names in force
        params = SamplingParams(
            temperature=0, max_tokens=16, stop_token_ids=[stop], ignore_eos=ignore_eos
        )
        out = llm.generate([ids], params)
        assert out[0].token_ids == free[: first + 1]
        assert out[0].finish_reason == "stop"
    assert llm.generate([ids], GREEDY)[0].finish_reason == "length"


def test_stop_strings_end_the_answer_where_the_string_appears(llm):
    ids = random_tokens(20, seed=4)
    free = llm.generate([ids], GREEDY)[0].token_ids
    text = llm.decode(free)
    stop = text[len(llm.decode(free[:6])) :][:3]  # three characters from about token 7 on
    assert stop.strip(), "the sample must stop on visible text"
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    out = llm.generate([ids], params)[0]
    # The text ends before the stop string; the tokens, before the token it starts in.
    start = text.index(stop)
    keep = max(n for n in range(len(free) + 1) if len(llm.decode(free[:n])) <= start)
    assert out.token_ids == free[:keep] and out.text == text[:start]
    assert out.finish_reason == "stop"
    assert llm.generate([ids], greedy_with(stop=["never in this answer"]))[0].token_ids == free


def greedy_with(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(stop=[""]),
        dict(stop="end"),
    ],
)
def test_invalid_sampling_params_are_refused(kwargs):
    with pytest.raises(InvalidInput):
        SamplingParams(**kwargs)


def test_prompt_forms(llm):
    chat = [{"role": "user", "content": "Hi"}]
    ids = llm.encode(chat)
    assert llm.encode(ids) == ids
    assert llm.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    text = llm.tokenizer.decode(ids)
    assert llm.encode(text) == ids
    with pytest.raises(InvalidInput):
        llm.generate([[]], GREEDY)


def test_block_manager_reference_counts_and_claims():
    bm = BlockManager(num_blocks=4, block_size=8)
    a = bm.allocate(2)
    bm.retain(a)
    bm.release(a)
    assert bm.num_free == 2
    from kvchunks.engine.kv_segment import KVSegment

    seg = KVSegment(tuple(a), 0, 11, 0)
    bm.seal(seg)
    blocks, start = bm.continue_after(seg)
    assert (blocks, start) == ([a[1]], 3)
    assert bm.continue_after(seg) == ([], 0)  # the tail is taken now
    bm.release(a)
    assert bm.num_free == 3
    bm.release([a[1]])
    assert bm.num_free == 4
    with pytest.raises(CapacityError):
        bm.allocate(5)


def test_blocks_freed_last_are_handed_out_first_in_their_old_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(3) == [0, 1, 2]  # a fresh pool hands out adjacent blocks
    middle = bm.allocate(3)
    bm.allocate(1)
    bm.release(middle)
    assert bm.allocate(3) == middle  # still in the caches, and still one run of slots
    assert bm.allocate(1) == [7]


def test_a_reserved_request_keeps_its_blocks_and_frees_the_unused_ones(model_path, llm):
    small = LLM(model_path, EngineConfig(num_blocks=5, block_size=16))
    small.runner.model = llm.runner.model
    bm = small.block_manager
    prompt = random_tokens(20, seed=5)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].token_ids
    stop = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[expected[5]])
    seq = small.add_request(prompt, stop, keep_kv=True, reserve=True)
    assert bm.num_free == 1  # 20 + 40 tokens: four blocks taken at once
    others = bm.allocate(1)  # whatever else allocates meanwhile cannot take them
    assert list(small.stream(seq)) == expected[: expected.index(expected[5]) + 1]
    own = seq.own_segment()
    assert own.length == 20 + len(seq.completion_token_ids)
    assert len(own.blocks) == 2 and bm.num_free == 2  # the unused two went back
    small.release(own)
    bm.release(others)
    assert bm.num_free == 5
    # Without the reservation the same request starves once the pool is taken.
    seq = small.add_request(prompt, params, keep_kv=True)
    others = bm.allocate(5)
    with pytest.raises(InvalidInput, match="cannot hold"):
        small.step()
    small.abort(seq)
    bm.release(others)
    with pytest.raises(CapacityError):  # a reservation that does not fit is refused at once
        small.add_request(random_tokens(90, seed=6), params, keep_kv=True, reserve=True)
    assert bm.num_free == 5 and small.scheduler.is_finished()


def test_threads_streaming_their_own_requests_share_the_steps(llm):
    """Each thread drives the engine until its own request is done; a step one thread runs
    also advances (or finishes) the others' requests."""
    prompts = prompts_of_lengths([9, 30, 70, 120, 5, 44])
    expected = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    lock = threading.Lock()
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            seq = llm.add_request(prompts[i], GREEDY)
            got[i] = list(llm.stream(seq, lock))
        except BaseException as e:  # handed to the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and [got[i] for i in range(len(prompts))] == expected


def test_a_request_holds_the_kv_it_attends_to_until_it_finishes(llm):
    """A chunk moved or deleted while an answer reads it drops its own reference only: the
    answer still reads the same KV, and the blocks are freed when it is done."""
    free_before = llm.block_manager.num_free
    doc, question = random_tokens(100, seed=21), random_tokens(9, seed=22)
    kept = llm.prefill(doc).segment
    reference = llm.add_request(question, GREEDY, [kept])
    want = list(llm.stream(reference))
    seq = llm.add_request(question, GREEDY, [kept])
    llm.release(kept)  # as a tier move or a delete lets go of the chunk's blocks
    assert llm.block_manager.num_free == free_before - len(kept.blocks)
    # Freed, its blocks would be the first handed out (to this answer's own tokens).
    assert list(llm.stream(seq)) == want
    assert llm.block_manager.num_free == free_before


def test_a_request_aborted_before_it_ran_gives_back_the_tail_it_claimed(llm):
    free_before = llm.block_manager.num_free
    prompt = llm.prefill(random_tokens(20, seed=23)).segment  # ends mid-block: an open tail
    answer = (random_tokens(5, seed=24), GREEDY, [prompt])
    seq = llm.add_request(*answer, keep_kv=True, continue_after=prompt)
    assert seq.blocks[0] == prompt.blocks[-1]
    llm.abort(seq)
    llm.release(seq.own_segment())  # what it computed is the caller's: nothing here
    again = llm.add_request(*answer, keep_kv=True, continue_after=prompt)
    assert again.blocks[0] == prompt.blocks[-1], "the tail stayed claimed by the aborted one"
    llm.abort(again)
    llm.release(again.own_segment())
    llm.release(prompt)
    assert llm.block_manager.num_free == free_before


def test_a_failed_generate_leaves_nothing_queued(model_path, llm):
    small = LLM(model_path, EngineConfig(num_blocks=4, block_size=16))
    small.runner.model = llm.runner.model
    too_long = SamplingParams(temperature=0, max_tokens=80)  # 8 + 80 tokens: 6 blocks
    with pytest.raises(CapacityError):
        small.generate([random_tokens(8, seed=25), random_tokens(8, seed=26)], [GREEDY, too_long])
    assert small.scheduler.is_finished() and small.block_manager.num_free == 4
    assert len(small.generate([random_tokens(8, seed=27)], GREEDY)[0].token_ids) == 16


def test_a_failed_write_gives_its_blocks_back(llm, monkeypatch):
    free_before = llm.block_manager.num_free
    segment = llm.prefill(random_tokens(40, seed=28)).segment
    k, v = llm.read_kv([segment])
    llm.release(segment)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("kvchunks.engine.llm.scatter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.write_kv(k, v, 0)
    assert llm.block_manager.num_free == free_before


def scripted(monkeypatch, llm: LLM, *pieces: str) -> None:
    """Make the engine's sampler spell the pieces' tokens one by one, then end the answer."""
    encode = llm.tokenizer.encode
    tokens = iter([t for piece in pieces for t in encode(piece, add_special_tokens=False)])
    end = llm.eos_token_ids[0]
    monkeypatch.setattr(llm_module, "sample", lambda _logits, seqs: [next(tokens, end)] * len(seqs))


@pytest.mark.parametrize("stop", ["世界", "😀", "world"])
def test_a_stop_string_of_many_byte_characters_ends_the_answer(tiny_llm, monkeypatch, stop):
    """A byte-level tokenizer may spend a token on each byte: 世界 takes 5 tokens."""
    scripted(monkeypatch, tiny_llm, f"Hello {stop} and more text after it")
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    [out] = tiny_llm.generate([random_tokens(5, seed=8)], params)
    assert (out.text, out.finish_reason) == ("Hello ", "stop")


def test_stream_yields_no_token_a_stop_string_later_cuts(tiny_llm, monkeypatch):
    scripted(monkeypatch, tiny_llm, "Hello", " wor", "ld", " again")  # " wor" is cut
    params = SamplingParams(temperature=0, max_tokens=8, stop=[" world"])
    seq = tiny_llm.add_request(random_tokens(5, seed=9), params)
    streamed = list(tiny_llm.stream(seq))
    assert streamed == seq.completion_token_ids
    assert tiny_llm.tokenizer.decode(streamed) == "Hello"


def test_a_reserved_request_is_never_preempted_for_another(tiny_checkpoint):
    small = LLM(tiny_checkpoint("llama"), EngineConfig(num_blocks=6, block_size=16))
    bm = small.block_manager
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = small.add_request(random_tokens(16, seed=10), long)
    small.step()  # its prefill: one full block, the next token needs another
    short = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reserved = small.add_request(random_tokens(10, seed=11), short, keep_kv=True, reserve=True)
    held = list(reserved.blocks)
    others = bm.allocate(bm.num_free)  # whatever else allocates meanwhile
    small.step()  # the reserved request's prefill
    small.step()  # the plain one cannot grow: it gives way, not the reserved one
    assert reserved.blocks == held and plain.blocks == [] and small.scheduler.num_preemptions
    small.abort(plain)
    small.abort(reserved)
    small.release(reserved.own_segment())
    bm.release(others)
    assert bm.num_free == 6


def test_a_preempted_request_reopens_the_tail_it_continued(tiny_checkpoint):
    small = LLM(tiny_checkpoint("llama"), EngineConfig(num_blocks=6, block_size=16))
    bm = small.block_manager
    base = small.prefill(random_tokens(10, seed=12)).segment  # its block's tail is open
    assert bm.blocks_to_follow(base, 1) == 0
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    first = small.add_request(random_tokens(15, seed=13), params)
    small.step()
    after = small.add_request(random_tokens(10, seed=14), params, [base], 10, True, base)
    small.step()  # the first request's 16th token fills its block; the later one starts
    others = bm.allocate(bm.num_free)
    small.step()  # the first request must grow: the later one, in base's tail, is preempted
    assert after.blocks == [] and small.scheduler.num_preemptions
    small.abort(after)
    small.abort(first)
    bm.release(others)
    assert bm.blocks_to_follow(base, 1) == 0  # base can be continued in its block again
    small.release(base)
    assert bm.num_free == 6


class Stopped(Exception):
    pass


@pytest.mark.parametrize("stop_at", [1, 15, 30])
def test_a_step_stopped_between_layers_leaves_its_batch_as_it_was(llm, stop_at):
    """A caller's check may stop a step mid-pass (its client gone during a long prefill)
    while other callers' sequences share the step: they are computed again by the next step
    and answer as if nothing happened."""
    prompts = prompts_of_lengths([90, 33, 150])
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    free_before = llm.block_manager.num_free
    seqs = [llm.add_request(p, GREEDY) for p in prompts]

    def stop(done: int, _layers: int) -> None:
        if done == stop_at:
            raise Stopped

    with pytest.raises(Stopped), llm.layer_progress(stop):
        llm.step()  # the three prompts' prefill, in one pass
    assert all(seq.num_computed == 0 for seq in seqs)
    llm.abort(seqs[1])  # the stopped caller's own sequence goes
    while not llm.scheduler.is_finished():
        llm.step()
    assert [s.completion_token_ids for s in (seqs[0], seqs[2])] == [expected[0], expected[2]]
    assert llm.block_manager.num_free == free_before


def test_callbacks_between_layers_are_this_threads_own_and_none_while_unwatched(llm):
    seen: list[int] = []
    with llm.layer_progress(lambda done, _layers: seen.append(done)):
        llm.release(llm.prefill(random_tokens(5, seed=29)).segment)
        with llm.runner.model.unwatched():
            llm.release(llm.prefill(random_tokens(5, seed=30)).segment)
        other = threading.Thread(target=lambda: llm.generate([random_tokens(5, seed=31)], GREEDY))
        other.start()
        other.join()
        llm.release(llm.prefill(random_tokens(5, seed=32)).segment)
    llm.release(llm.prefill(random_tokens(5, seed=33)).segment)
    layers = len(llm.runner.model.layers)
    assert seen == [*range(1, layers + 1)] * 2
