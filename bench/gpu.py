"""The engine on a CUDA device against Hugging Face transformers on the same GPU, in one run.

Prints one JSON object last, with the device named: greedy decode tokens/s at batch 1 and
at batch 32 (against HF's batched `generate` of the same prompts and lengths, prefill left
out on both sides), prefill tokens/s, and the time to the first token of a question over
4 x 512-token documents whose KV is stored, each computed on its own as documents loaded
one by one are, and attended as stored (`reuse`), against HF prefilling the same text in
full. Each figure is the median of --repeats runs after a warm-up; every time is taken
after the device has finished its work. Goals: decode at batch 32 at least 3x HF's,
reuse TTFT at least 20x faster than HF's full prefill.

Needs CUDA: without it, it says so in one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from kvchunks.bench.engine import median_of, random_ids
from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.engine.checkpoint import resolve_model

GOALS = {"decode_batch_ratio": 3.0, "reuse_ttft_ratio": 20.0}  # decode_batch at 32


def synced(fn) -> float:
    """Seconds fn takes, the device's queued work included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def hf_generate(hf, ids: torch.Tensor, new_tokens: int) -> None:
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=2,
        )


def bench_decode(llm, hf, prompts: list[list[int]], new_tokens: int, repeats: int):
    """Decode tokens/s of all prompts at once (equal lengths: no padding for HF)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    decoded = len(prompts) * (new_tokens - 1)

    def ours() -> float:
        seqs = [llm.add_request(p, params) for p in prompts]
        llm.step()  # the prefill of the whole batch, and each sequence's first token

        def rest() -> None:
            while not all(s.is_finished for s in seqs):
                llm.step()

        return decoded / synced(rest)

    def theirs() -> float:
        ids = torch.tensor(prompts, device=hf.device)
        prefill = synced(lambda: hf_generate(hf, ids, 1))
        return decoded / (synced(lambda: hf_generate(hf, ids, new_tokens)) - prefill)

    ours(), theirs()  # warm-up: compiles, captures graphs
    return median_of(ours, repeats), median_of(theirs, repeats)


def bench_prefill(llm, hf, ids: list[int], repeats: int):
    def ours() -> None:
        result = llm.prefill(ids)
        int(result.logits[-1].argmax())
        llm.release(result.segment)

    def theirs() -> None:
        with torch.inference_mode():
            hf(torch.tensor([ids], device=hf.device), logits_to_keep=1)

    ours(), theirs()
    return (
        median_of(lambda: len(ids) / synced(ours), repeats),
        median_of(lambda: len(ids) / synced(theirs), repeats),
    )


def bench_reuse(llm, hf, docs: list[list[int]], question: list[int], repeats: int):
    """Seconds to the first token over the stored documents, and HF's over the full text."""
    stored = [llm.prefill(doc, position=0).segment for doc in docs]

    def ours() -> None:
        result = llm.prefill(question, context=stored)
        int(result.logits[-1].argmax())
        llm.release(result.segment)

    def theirs() -> None:
        ids = torch.tensor([[t for doc in docs for t in doc] + question], device=hf.device)
        with torch.inference_mode():
            int(hf(ids, logits_to_keep=1).logits[0, -1].argmax())

    ours(), theirs()
    times = median_of(lambda: synced(ours), repeats), median_of(lambda: synced(theirs), repeats)
    for segment in stored:
        llm.release(segment)
    return times


def profile(llm, prompts: list[list[int]], docs: list[list[int]], question: list[int]) -> None:
    """The busiest operations, on stderr, of a question over stored documents and of a step
    of the batch's decode (both warm)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled

    stored = [llm.prefill(doc, position=0).segment for doc in docs]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    seqs = [llm.add_request(p, params) for p in prompts]
    llm.step()
    llm.step()  # the prefill, then one decode step: the next one is warm
    runs = {
        "reuse ttft": lambda: llm.release(llm.prefill(question, context=stored).segment),
        f"decode step, batch {len(prompts)}": llm.step,
    }
    for name, run in runs.items():
        with profiled(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            synced(run)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        print(f"--- {name}\n{table}", file=sys.stderr, flush=True)
    while not all(s.is_finished for s in seqs):
        llm.step()
    for segment in stored:
        llm.release(segment)


def progress(name: str, figures: tuple[float, float]) -> tuple[float, float]:
    """Each figure on stderr as it comes, ours then HF's: a run cut short keeps what it had."""
    print(f"{name}: {figures[0]:.5g} (HF {figures[1]:.5g})", file=sys.stderr, flush=True)
    return figures


SMOKE = {
    "batch": 4,
    "prompt_tokens": 16,
    "new_tokens": 4,
    "prefill_tokens": 64,
    "doc_tokens": 32,
    "repeats": 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default model if unset)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="flex", help="the engine's attention backend")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--doc-tokens", type=int, default=512, help="each of the 4 documents")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-mb", type=int, default=4096, help="the engine's KV pool")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument(
        "--profile", action="store_true", help="where a reuse TTFT's and a decode step's time goes"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device and torch sees none; run it on a GPU machine")
    if args.smoke:
        vars(args).update(SMOKE)

    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    config = EngineConfig(
        device="cuda",
        dtype=args.dtype,
        attention_backend=args.backend,
        enforce_eager=args.enforce_eager,
        kv_cache_bytes=args.kv_cache_mb << 20,
    )
    llm = LLM(path, config)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=config.torch_dtype).to("cuda").eval()
    rng = random.Random(0)

    prompts = [random_ids(rng, args.prompt_tokens) for _ in range(args.batch)]
    one = progress(
        "decode b1 tok/s", bench_decode(llm, hf, prompts[:1], args.new_tokens, args.repeats)
    )
    batch = progress(
        f"decode b{args.batch} tok/s", bench_decode(llm, hf, prompts, args.new_tokens, args.repeats)
    )
    prefill = progress(
        "prefill tok/s", bench_prefill(llm, hf, random_ids(rng, args.prefill_tokens), args.repeats)
    )
    docs = [random_ids(rng, args.doc_tokens) for _ in range(4)]
    reuse = progress("reuse ttft s", bench_reuse(llm, hf, docs, random_ids(rng, 24), args.repeats))
    if args.profile:
        profile(llm, prompts, docs, random_ids(rng, 24))
    result = {
        "device": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "backend": type(llm.runner.backend).__name__,
        "cuda_graphs": llm.runner.graphs is not None,
        "repeats": args.repeats,
        "decode_prompt_tokens": args.prompt_tokens,
        "decode_new_tokens": args.new_tokens,
        "decode_b1_tok_s": round(one[0], 1),
        "hf_decode_b1_tok_s": round(one[1], 1),
        "decode_b1_ratio": round(one[0] / one[1], 3),
        "decode_batch": args.batch,
        "decode_batch_tok_s": round(batch[0], 1),
        "hf_decode_batch_tok_s": round(batch[1], 1),
        "decode_batch_ratio": round(batch[0] / batch[1], 3),
        "prefill_tokens": args.prefill_tokens,
        "prefill_tok_s": round(prefill[0], 1),
        "hf_prefill_tok_s": round(prefill[1], 1),
        "prefill_ratio": round(prefill[0] / prefill[1], 3),
        "reuse_docs": [4, args.doc_tokens],
        "reuse_ttft_s": round(reuse[0], 5),
        "hf_full_prefill_ttft_s": round(reuse[1], 5),
        "reuse_ttft_ratio": round(reuse[1] / reuse[0], 2),
        "goals": GOALS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
