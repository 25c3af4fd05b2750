"""CUDA paths: the torch backend on the GPU against HF, flash-attn against torch, and the
pinned host tier."""

from __future__ import annotations

import pytest
import torch
from reference import hf_logits
from test_engine_reference import random_tokens

from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_llm(model_path):
    return LLM(model_path, EngineConfig(device="cuda", kv_cache_bytes=1 << 30))


def test_cuda_logits_match_reference(cuda_llm, hf_model):
    ids = random_tokens(257, seed=5)
    torch.backends.cuda.matmul.allow_tf32 = False
    result = cuda_llm.prefill(ids, all_logits=True)
    cuda_llm.release(result.segment)
    assert (result.logits.cpu() - hf_logits(hf_model, ids)).abs().max().item() <= 1e-4


def test_cuda_batched_equals_one_at_a_time(cuda_llm):
    prompts = [random_tokens(n, seed=n) for n in (5, 77, 300)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batched = [o.token_ids for o in cuda_llm.generate(prompts, params)]
    assert batched == [cuda_llm.generate([p], params)[0].token_ids for p in prompts]


def test_flash_attn_matches_torch_backend(model_path):
    pytest.importorskip("flash_attn")
    config = dict(device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 30)
    flash = LLM(model_path, EngineConfig(attention_backend="flash-attn", **config))
    plain = LLM(model_path, EngineConfig(attention_backend="torch", **config))
    doc, question = random_tokens(300, 1), random_tokens(20, 2)
    outs = []
    for llm in (flash, plain):
        rd = llm.prefill(doc)
        rq = llm.prefill(question, context=[rd.segment], all_logits=True)
        outs.append(rq.logits.float().cpu())
    assert (outs[0] - outs[1]).abs().max().item() < 0.1
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


def test_host_tier_is_pinned_whichever_way_a_chunk_came(model_path, tmp_path):
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
