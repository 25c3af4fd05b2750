"""The engine against Hugging Face transformers on the same checkpoint (float32)."""

from __future__ import annotations

import pytest
import torch
from reference import hf_generate, hf_logits

from kvchunks.engine import LLM, EngineConfig, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


def random_tokens(n: int, seed: int, vocab: int = 49152) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_prefill_logits_match_reference(llm, hf_model, n):
    ids = random_tokens(n, seed=n)
    result = llm.prefill(ids, all_logits=True)
    try:
        diff = (result.logits - hf_logits(hf_model, ids)).abs().max().item()
    finally:
        llm.release(result.segment)
    assert diff <= 1e-4


def test_greedy_chat_matches_reference(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=32)
    eos = hf_eos_ids(hf_model)
    for chat, out in zip(CHATS, llm.generate(CHATS, params), strict=True):
        expected = hf_generate(hf_model, llm.encode(chat), 32)
        # The whole answer, its end included: an early stop or a missed one is a mismatch.
        assert out.token_ids == expected
        assert out.finish_reason == ("stop" if expected[-1] in eos else "length")
        assert out.text == llm.decode(expected)
        assert out.text.strip()


def hf_eos_ids(hf_model) -> set[int]:
    """The tokens HF's generate stops at, from its own generation config."""
    eos = hf_model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


# llama-bias: Llama's attention_bias puts a bias on the output projection too, unlike Qwen2's.
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "llama-bias"])
def test_random_weight_families_match_reference(tiny_checkpoint, family):
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(family)
    ours = LLM(folder, EngineConfig(kv_cache_bytes=64 << 20, block_size=16))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = random_tokens(77, seed=7)
    result = ours.prefill(ids, all_logits=True)
    assert (result.logits - hf_logits(hf, ids)).abs().max().item() <= 1e-4
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    (out,) = ours.generate([ids], params)
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32
        )[0, len(ids) :].tolist()
    assert out.token_ids == expected


def test_bfloat16_runs_close_to_float32(model_path, llm):
    bf16 = LLM(model_path, EngineConfig(kv_cache_bytes=64 << 20, dtype="bfloat16"))
    ids = llm.encode(CHATS[0])
    a = llm.prefill(ids)
    b = bf16.prefill(ids)
    llm.release(a.segment)
    assert a.logits.argmax().item() == b.logits.argmax().item()
    assert bf16.runner.kv_cache.dtype == torch.bfloat16
