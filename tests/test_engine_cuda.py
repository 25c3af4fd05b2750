"""CUDA paths: logits against HF in float32 and bfloat16, the flex backend against the torch
reference path, batching, chunked prefill, decode and short-prefill graphs against eager
runs, flash-attn against torch, and the pinned host tier with its copy stream. Skipped
without a CUDA device.

Tolerances: float32 logits within 1e-4 of HF's float32 forward (TF32 off), the design's
oracle; the flex and torch backends within 1e-4 of each other in float32. bfloat16 logits
against HF's float32 forward: the largest difference within 5% of the reference's logit
range and the mean within 1% of it (bfloat16 keeps about three significant digits).
"""

from __future__ import annotations

import threading

import pytest
import torch
from reference import hf_logits
from test_engine_filtered import check_shifted_and_plain_batch
from test_engine_flex import decode_in_shrinking_batches, prefill_steps, short_prefills
from test_engine_reference import random_tokens

from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.engine.attention import TorchAttention
from kvchunks.engine.flex_attention import FlexAttention
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def cuda_engine(model_path, **settings) -> LLM:
    return LLM(model_path, EngineConfig(device="cuda", kv_cache_bytes=1 << 30, **settings))


@pytest.fixture(scope="module")
def cuda_llm(model_path):
    """The flex backend with decode graphs, float32."""
    llm = cuda_engine(model_path, attention_backend="flex")
    assert isinstance(llm.runner.backend, FlexAttention) and llm.runner.graphs is not None
    return llm


@pytest.fixture(scope="module")
def torch_llm(model_path):
    return cuda_engine(model_path, attention_backend="torch")


def test_auto_is_flex_with_graphs_on_cuda_when_blocks_fit_its_kernels(model_path):
    fits = LLM(model_path, EngineConfig(device="cuda", kv_cache_bytes=64 << 20))
    assert isinstance(fits.runner.backend, FlexAttention) and fits.runner.graphs is not None
    small = LLM(model_path, EngineConfig(device="cuda", kv_cache_bytes=64 << 20, block_size=16))
    assert type(small.runner.backend) is TorchAttention and small.runner.graphs is None


def test_cuda_logits_match_reference(cuda_llm, torch_llm, hf_model):
    ids = random_tokens(257, seed=5)
    reference = hf_logits(hf_model, ids)
    for llm in (cuda_llm, torch_llm):
        result = llm.prefill(ids, all_logits=True)
        llm.release(result.segment)
        assert (result.logits.cpu() - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_bfloat16_logits_are_close_to_reference(model_path, hf_model, backend):
    llm = cuda_engine(model_path, dtype="bfloat16", attention_backend=backend)
    ids = random_tokens(300, seed=6)
    reference = hf_logits(hf_model, ids)
    result = llm.prefill(ids, all_logits=True)
    llm.release(result.segment)
    diff = (result.logits.float().cpu() - reference).abs()
    spread = (reference.max() - reference.min()).item()
    assert diff.max().item() <= 0.05 * spread and diff.mean().item() <= 0.01 * spread


def test_flex_over_segments_matches_torch_backend(cuda_llm, torch_llm):
    """Segments starting and ending mid-block, a hole inside a block, a RoPE shift."""
    for flex, reference in zip(prefill_steps(cuda_llm), prefill_steps(torch_llm), strict=True):
        assert (flex - reference).abs().max().item() <= 1e-4


def test_decode_graphs_match_eager_and_torch(cuda_llm, torch_llm, model_path):
    eager = cuda_engine(model_path, attention_backend="flex", enforce_eager=True)
    expected = decode_in_shrinking_batches(torch_llm)
    assert decode_in_shrinking_batches(eager) == expected
    assert decode_in_shrinking_batches(cuda_llm) == expected
    assert cuda_llm.runner.graphs.captured, "no decode step replayed a graph"
    assert decode_in_shrinking_batches(cuda_llm) == expected  # the graphs again, new data


def test_short_prefill_graphs_match_torch_backend(cuda_llm, torch_llm):
    """Prompts of up to 128 tokens over stored KV replay graphs of 16 and 32 queries."""
    for graphed, reference in zip(short_prefills(cuda_llm), short_prefills(torch_llm), strict=True):
        assert (graphed - reference).abs().max().item() <= 1e-4
    assert {(1, 16), (1, 32)} <= set(cuda_llm.runner.graphs.captured)


def test_a_check_between_layers_does_not_cut_a_graphs_capture(cuda_llm):
    """A check that raises between layers (a client gone) does not run while a graph is
    captured, and a replay runs no Python between layers: the step that captures a new
    short-prefill graph completes, the graph is kept, and the answer is unchanged."""
    graphs, prompt = cuda_llm.runner.graphs, random_tokens(100, seed=41)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = cuda_llm.generate([prompt], params)[0].token_ids
    graphs.captured.pop((1, 128), None)  # captured again by the step below
    seq = cuda_llm.add_request(prompt, params)

    def stop(_done: int, _layers: int) -> None:
        raise RuntimeError("stopped between layers")

    with cuda_llm.layer_progress(stop):
        cuda_llm.step()
    assert (1, 128) in graphs.captured and seq.num_completion_tokens == 1
    while not seq.is_finished:
        cuda_llm.step()
    assert seq.completion_token_ids == expected


def test_stored_kv_in_pieces_matches_reference(cuda_llm, hf_model, monkeypatch):
    """LLM.prefill at a step budget of 100: three pieces, two of them ending inside a block;
    1e-3 as on the CPU (pieces add up their attention in another order than one pass)."""
    monkeypatch.setattr(cuda_llm.scheduler, "max_num_batched_tokens", 100)
    ids = random_tokens(257, seed=5)
    result = cuda_llm.prefill(ids, all_logits=True)
    cuda_llm.release(result.segment)
    assert (result.logits.cpu() - hf_logits(hf_model, ids)).abs().max().item() <= 1e-3


def test_pieces_beside_running_answers_answer_as_the_torch_backend(
    cuda_llm, torch_llm, monkeypatch
):
    """Chunked prefill on CUDA: a long prompt read in pieces of a 128-token budget while two
    answers decode, in steps that mix both (run eager: graphs take decode-only steps and
    one short prompt), then decode-only steps (graphs); every answer as the torch backend
    gives it alone."""
    prompts = [random_tokens(n, seed=90 + n) for n in (20, 45, 700)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [torch_llm.generate([p], params)[0].token_ids for p in prompts]
    monkeypatch.setattr(cuda_llm.scheduler, "max_num_batched_tokens", 128)
    seqs = [cuda_llm.add_request(p, params) for p in prompts[:2]]
    cuda_llm.step()
    seqs.append(cuda_llm.add_request(prompts[2], params))
    mixed = 0
    while not cuda_llm.scheduler.is_finished():
        cuda_llm.step()
        mixed += 0 < seqs[2].num_scheduled < 128 and not seqs[2].num_completion_tokens
    assert mixed >= 5  # 700 tokens at most 126 a step beside the two answers
    assert [s.completion_token_ids for s in seqs] == expected


def test_cuda_batched_equals_one_at_a_time(cuda_llm):
    prompts = [random_tokens(n, seed=n) for n in (5, 77, 300)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batched = [o.token_ids for o in cuda_llm.generate(prompts, params)]
    assert batched == [cuda_llm.generate([p], params)[0].token_ids for p in prompts]


def test_cuda_shifted_and_plain_sequences_decode_like_hf(torch_llm, hf_model):
    """The torch backend's padded decode with a shifted segment (its rotation tables are
    made on the device)."""
    check_shifted_and_plain_batch(torch_llm, hf_model)


def test_seeded_sampling_draws_the_same_on_cuda_and_cpu(cuda_llm, model_path):
    cpu_llm = LLM(model_path, EngineConfig(device="cpu", kv_cache_bytes=64 << 20))
    ids = random_tokens(30, seed=3)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=12, seed=11)
    on_cuda = cuda_llm.generate([ids], seeded)[0].token_ids
    assert on_cuda == cpu_llm.generate([ids], seeded)[0].token_ids


def test_flash_attn_matches_torch_backend(model_path):
    pytest.importorskip("flash_attn")
    flash = cuda_engine(model_path, dtype="bfloat16", attention_backend="flash-attn")
    plain = cuda_engine(model_path, dtype="bfloat16", attention_backend="torch")
    doc, question = random_tokens(300, 1), random_tokens(20, 2)
    outs = []
    for llm in (flash, plain):
        rd = llm.prefill(doc)
        rq = llm.prefill(question, context=[rd.segment], all_logits=True)
        outs.append(rq.logits.float().cpu())
    assert (outs[0] - outs[1]).abs().max().item() < 0.1
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


def test_host_tier_is_pinned_and_moves_bitwise(model_path, tmp_path):
    config = EngineConfig(device="cuda", kv_cache_bytes=256 << 20)
    store = ChunkStore(model_path, home=tmp_path, engine_config=config)
    try:
        cm = ContextManager(store=store)
        from_pool = cm.add_chunk("The vault code is 4817.")
        from_file = cm.add_chunk("The mill stands in Zurich.")
        cm.archive_to_disk(from_file.hash)
        k0, v0 = store.model.llm.read_kv(store.composer.segments(cm.registry.get(from_pool.hash)))
        for chunk in (from_pool, from_file):
            assert cm.move_to_cpu(chunk.hash).tier == "cpu"
            assert all(t.is_pinned() for t in store.host.kv[chunk.hash])
        cm.move_to_gpu(from_pool.hash)
        k1, v1 = store.model.llm.read_kv(store.composer.segments(cm.registry.get(from_pool.hash)))
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    finally:
        store.close()


def test_kv_round_trips_through_pinned_memory_on_the_copy_stream(cuda_llm):
    llm = cuda_llm
    done = llm.prefill(random_tokens(300, seed=7))  # across a block boundary
    k_dev, v_dev = llm.read_kv([done.segment])  # on the device, on the current stream
    k, v = llm.read_kv([done.segment], lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
    assert k.is_pinned() and v.is_pinned()
    assert isinstance(llm.copies.stream, torch.cuda.Stream)  # the copy stream was used
    assert torch.equal(k, k_dev.cpu()) and torch.equal(v, v_dev.cpu())
    copy = llm.write_kv(k, v, position=0)
    # The host copies go at once and their pinned memory is taken again and overwritten:
    # the allocator must hold it back until the copy into the pool is done.
    del k, v
    for _ in range(4):
        torch.empty(k_dev.nbytes * 2, dtype=torch.uint8, pin_memory=True).fill_(255)
    k2, v2 = llm.read_kv([copy])  # read on the compute stream right after the write
    assert torch.equal(k2, k_dev) and torch.equal(v2, v_dev)
    llm.release(copy)
    llm.release(done.segment)


def test_a_move_to_cpu_while_another_thread_decodes_keeps_its_tokens(model_path, tmp_path):
    config = EngineConfig(device="cuda", kv_cache_bytes=256 << 20)
    store = ChunkStore(model_path, home=tmp_path, engine_config=config, prefetch_policy="explicit")
    try:
        cm = ContextManager(store=store)
        doc = cm.add_chunk("The vault code is 4817. The vault is under the old mill in Zurich.")
        other = cm.add_chunk("The lighthouse keeper owns three goats and a red boat.")
        cm.activate_chunk(doc.hash)
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        expected = cm.generate("Where is the vault?", params).token_ids
        k0, v0 = store.model.llm.read_kv(store.composer.segments(cm.registry.get(other.hash)))
        stop, moves = threading.Event(), []

        def move_back_and_forth():
            while not (moves and stop.is_set()):  # at least once, however fast the decode
                store.tiers.to_host(cm.registry.get(other.hash))  # copied out unlocked
                cm.move_to_gpu(other.hash)  # copied in under the lock, between steps
                moves.append(1)

        mover = threading.Thread(target=move_back_and_forth)
        mover.start()
        try:
            assert cm.generate("Where is the vault?", params).token_ids == expected
        finally:
            stop.set()
            mover.join(60)
        assert moves and not mover.is_alive()
        k1, v1 = store.model.llm.read_kv(store.composer.segments(cm.registry.get(other.hash)))
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    finally:
        store.close()
