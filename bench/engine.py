"""Engine vs Hugging Face transformers on the same checkpoint, in one run.

Prints one JSON object last: prefill tokens/s at 2,048 tokens, decode tokens/s at batch 1,
and useful output tokens/s for 32 concurrent requests of different prompt and output lengths,
each with the engine/HF ratio. Every figure is the median of --repeats runs after a warm-up.

The batch is measured three ways. `batch_ratio`: against one left-padded `generate` call,
which prefills every prompt padded to the longest and decodes the longest output for every
request (what a plain HF user gets; HF does more work than the useful tokens counted).
`batch_equal_work_ratio`: the same requests against HF's own continuous batching
(`generate_batch`'s manager), each request with its own output length and no padding, so both
sides compute the same tokens (null where the installed transformers has none).
`batch_uniform_ratio`: requests that all have the same prompt and output lengths (the middle
of both ranges), against one `generate` call: equal work on HF's plainest path, no padding.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from kvchunks.bench import machine, token_range
from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.engine.checkpoint import resolve_model


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` runs."""
    return statistics.median(elapsed(fn) for _ in range(repeats))


def median_of(rate, repeats: int) -> float:
    return statistics.median(rate() for _ in range(repeats))


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def bench_prefill(llm, hf, ids, repeats):
    def ours():
        llm.release(llm.prefill(ids).segment)

    def theirs():
        with torch.inference_mode():
            hf(torch.tensor([ids], device=hf.device), logits_to_keep=1)

    ours(), theirs()  # warm-up
    return len(ids) / timed(ours, repeats), len(ids) / timed(theirs, repeats)


def bench_decode(llm, hf, ids, new_tokens, repeats):
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def ours() -> float:
        seq = llm.add_request(ids, params)
        llm.step()  # prefill
        start = time.perf_counter()
        while not seq.is_finished:
            llm.step()
        return (new_tokens - 1) / (time.perf_counter() - start)

    def theirs() -> float:
        prompt = torch.tensor([ids], device=hf.device)
        with torch.inference_mode():
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
            return (new_tokens - 1) / (time.perf_counter() - start - prefill)

    ours(), theirs()  # warm-up
    return median_of(ours, repeats), median_of(theirs, repeats)


def batch_workload(rng: random.Random, args) -> tuple[list[list[int]], list[int]]:
    """Prompts and output lengths drawn uniformly from their ranges."""
    prompts = [random_ids(rng, rng.randint(*args.prompt_range)) for _ in range(args.requests)]
    return prompts, [rng.randint(*args.output_range) for _ in range(args.requests)]


def ours_batch(llm, prompts, out_lens) -> None:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    outputs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outputs] == out_lens


def hf_padded_batch(hf, pad: int, prompts, out_lens) -> None:
    """One left-padded generate call: every request decodes the longest output."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    with torch.inference_mode():
        hf.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=max(out_lens),
            min_new_tokens=max(out_lens),
            do_sample=False,
            pad_token_id=pad,
        )


def hf_continuous_batch(hf, prompts, out_lens) -> float:
    """HF's continuous batching, each request its own length, end-of-sequence off: the seconds
    from the first request in to the last answer out (the manager is set up before)."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    config = GenerationConfig(do_sample=False, max_new_tokens=max(out_lens))
    # Sized for this workload, as generate_batch sizes it.
    hints = WorkloadHints(max(len(p) for p in prompts), max(out_lens), len(prompts))
    with hf.continuous_batching_context_manager(
        generation_config=config, timeout=5, workload_hints=hints
    ) as manager:
        start = time.perf_counter()
        ids = [
            manager.add_request(p, max_new_tokens=n, eos_token_id=-1)
            for p, n in zip(prompts, out_lens, strict=True)
        ]
        done = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=600)  # None: it stopped, or hangs
            assert result is not None, "HF's continuous batching stopped"
            if result.is_finished():
                done[result.request_id] = len(result.generated_tokens)
        took = time.perf_counter() - start
    assert [done[i] for i in ids] == out_lens
    return took


def batch_runners(llm, hf, pad: int) -> dict:
    """Per system, a function running (prompts, output lengths) that returns its seconds."""
    runs = {
        "ours": lambda p, n: elapsed(lambda: ours_batch(llm, p, n)),
        "hf_padded": lambda p, n: elapsed(lambda: hf_padded_batch(hf, pad, p, n)),
    }
    if hasattr(hf, "continuous_batching_context_manager"):
        runs["hf_continuous"] = lambda p, n: hf_continuous_batch(hf, p, n)
    return runs


def bench_batch(runs: dict, workload, repeats: int) -> dict[str, float]:
    """Useful output tokens/s of each system on the workload, the median after a warm-up."""
    prompts, out_lens = workload
    useful = sum(out_lens)
    warm = (prompts[:4], [min(out_lens)] * len(prompts[:4]))
    rates = {}
    for name, run in runs.items():
        if name != "hf_continuous":  # its manager warms itself up in every session
            run(*warm)
        rates[name] = median_of(lambda run=run: useful / run(prompts, out_lens), repeats)
    return rates


def uniform_workload(rng: random.Random, args) -> tuple[list[list[int]], list[int]]:
    """As many requests, each with the middle prompt length and the middle output length."""
    prompt, output = sum(args.prompt_range) // 2, sum(args.output_range) // 2
    return [random_ids(rng, prompt) for _ in range(args.requests)], [output] * args.requests


SMOKE = {
    "prefill_tokens": 64,
    "decode_tokens": 4,
    "requests": 3,
    "prompt_range": (8, 24),
    "output_range": (2, 6),
    "repeats": 1,
    "kv_cache_mb": 256,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default model if unset)")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-range", type=token_range, default=(64, 256), help="MIN-MAX")
    parser.add_argument("--output-range", type=token_range, default=(64, 128), help="MIN-MAX")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-mb", type=int, default=2048, help="the engine's KV pool")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    llm = LLM(path, EngineConfig(dtype=args.dtype, kv_cache_bytes=args.kv_cache_mb << 20))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=llm.config.torch_dtype).eval()
    hf.to(llm.config.device)
    rng = random.Random(0)

    prefill = bench_prefill(llm, hf, random_ids(rng, args.prefill_tokens), args.repeats)
    decode = bench_decode(llm, hf, random_ids(rng, 32), args.decode_tokens, args.repeats)
    runs = batch_runners(llm, hf, llm.tokenizer.pad_token_id or 2)
    batch = bench_batch(runs, batch_workload(rng, args), args.repeats)
    plain = {name: runs[name] for name in ("ours", "hf_padded")}
    uniform = bench_batch(plain, uniform_workload(rng, args), args.repeats)
    continuous = batch.get("hf_continuous")
    result = {
        **machine(llm.config.device),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "prefill_tokens": args.prefill_tokens,
        "prefill_tok_s": round(prefill[0], 1),
        "hf_prefill_tok_s": round(prefill[1], 1),
        "prefill_ratio": round(prefill[0] / prefill[1], 3),
        "decode_tok_s": round(decode[0], 2),
        "hf_decode_tok_s": round(decode[1], 2),
        "decode_ratio": round(decode[0] / decode[1], 3),
        "batch_requests": args.requests,
        "batch_prompt_range": args.prompt_range,
        "batch_output_range": args.output_range,
        "batch_useful_tok_s": round(batch["ours"], 1),
        "hf_batch_useful_tok_s": round(batch["hf_padded"], 1),
        "batch_ratio": round(batch["ours"] / batch["hf_padded"], 3),
        "hf_continuous_batch_tok_s": continuous and round(continuous, 1),
        "batch_equal_work_ratio": continuous and round(batch["ours"] / continuous, 3),
        "batch_uniform_lengths": [sum(args.prompt_range) // 2, sum(args.output_range) // 2],
        "batch_uniform_tok_s": round(uniform["ours"], 1),
        "hf_batch_uniform_tok_s": round(uniform["hf_padded"], 1),
        "batch_uniform_ratio": round(uniform["ours"] / uniform["hf_padded"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
