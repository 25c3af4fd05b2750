"""Engine vs Hugging Face transformers on the same checkpoint, in one run.

Prints one JSON object last: prefill tokens/s at 2,048 tokens, decode tokens/s at batch 1,
and useful output tokens/s for 32 concurrent requests, each with the engine/HF ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.engine.checkpoint import resolve_model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def bench_prefill(llm, hf, ids, repeats):
    def ours():
        llm.release(llm.prefill(ids).segment)

    def theirs():
        with torch.inference_mode():
            hf(torch.tensor([ids]), logits_to_keep=1)

    ours(), theirs()  # warm-up
    return len(ids) / timed(ours, repeats), len(ids) / timed(theirs, repeats)


def bench_decode(llm, hf, ids, new_tokens):
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    seq = llm.add_request(ids, params)
    llm.step()  # prefill
    start = time.perf_counter()
    while not seq.is_finished:
        llm.step()
    ours = (new_tokens - 1) / (time.perf_counter() - start)
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        start = time.perf_counter()
        hf.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=2)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        hf.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=2,
        )
        theirs = (new_tokens - 1) / (time.perf_counter() - start - prefill)
    return ours, theirs


def bench_batch(llm, hf, tokenizer, rng, num_requests):
    prompts = [random_ids(rng, rng.randint(64, 256)) for _ in range(num_requests)]
    out_lens = [rng.randint(64, 128) for _ in range(num_requests)]
    useful = sum(out_lens)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    ours = time.perf_counter() - start
    assert sum(len(o.token_ids) for o in outputs) == useful
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 2
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=max(out_lens),
            min_new_tokens=max(out_lens),
            do_sample=False,
            pad_token_id=pad,
        )
    theirs = time.perf_counter() - start
    return useful / ours, useful / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default model if unset)")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    llm = LLM(path, EngineConfig(dtype=args.dtype, kv_cache_bytes=2 << 30))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=llm.config.torch_dtype).eval()
    hf.to(llm.config.device)
    rng = random.Random(0)

    prefill = bench_prefill(llm, hf, random_ids(rng, args.prefill_tokens), args.repeats)
    decode = bench_decode(llm, hf, random_ids(rng, 32), args.decode_tokens)
    batch = bench_batch(llm, hf, llm.tokenizer, rng, args.requests)
    result = {
        "device": llm.config.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "prefill_tokens": args.prefill_tokens,
        "prefill_tok_s": round(prefill[0], 1),
        "hf_prefill_tok_s": round(prefill[1], 1),
        "prefill_ratio": round(prefill[0] / prefill[1], 3),
        "decode_tok_s": round(decode[0], 2),
        "hf_decode_tok_s": round(decode[1], 2),
        "decode_ratio": round(decode[0] / decode[1], 3),
        "batch_requests": args.requests,
        "batch_useful_tok_s": round(batch[0], 1),
        "hf_batch_useful_tok_s": round(batch[1], 1),
        "batch_ratio": round(batch[0] / batch[1], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
