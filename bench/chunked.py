"""What a long prompt costs the answers already running, with chunked prefill and without.

Some answers are decoding when a long prompt arrives. With chunked prefill (the device's
default step budget) the prompt is read in pieces, and every step also gives each running
answer its next token; the competitor, in the same run, is the same engine reading the
prompt in one step (a budget as large as the prompt), as it did before chunking. Per run:
`stall_s`, the longest wait of the running answers for a token while the prompt is read
(the longest step until its first token); `prompt_ttft_s`, the prompt's time to first token;
`tokens_meanwhile`, the tokens each running answer got in that time. Medians of --repeats
runs, taken in turn, after a warm-up. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from kvchunks.bench import machine
from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.engine.checkpoint import resolve_model

SMOKE = {"running": 2, "prompt_tokens": 96, "budget": 32, "repeats": 1}


def one_run(llm: LLM, running: list[list[int]], prompt: list[int]) -> dict[str, float]:
    answers = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    seqs = [llm.add_request(ids, answers) for ids in running]
    try:
        while min(s.num_completion_tokens for s in seqs) < 2:  # every answer decoding
            llm.step()
        counts = [s.num_completion_tokens for s in seqs]
        arrived = time.perf_counter()
        long = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
        longest = 0.0
        while not long.num_completion_tokens:
            start = time.perf_counter()
            llm.step()
            longest = max(longest, time.perf_counter() - start)
        ttft = time.perf_counter() - arrived
        meanwhile = min(s.num_completion_tokens - n for s, n in zip(seqs, counts, strict=True))
    finally:
        for seq in seqs:
            llm.abort(seq)
        while not llm.scheduler.is_finished():
            llm.step()
    return {"stall_s": longest, "prompt_ttft_s": ttft, "tokens_meanwhile": meanwhile}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default model if unset)")
    parser.add_argument("--running", type=int, default=8, help="answers decoding meanwhile")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=None, help="step budget (device default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    path = resolve_model(args.model)
    seqs = args.running + 1
    chunked = LLM(path, EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=args.budget))
    whole_budget = args.prompt_tokens + args.running
    whole = LLM(path, EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=whole_budget))
    whole.runner.model = chunked.runner.model  # one copy of the weights
    rng = random.Random(0)
    running = [[rng.randrange(100, 49000) for _ in range(64)] for _ in range(args.running)]
    prompt = [rng.randrange(100, 49000) for _ in range(args.prompt_tokens)]
    engines = {"chunked": chunked, "whole": whole}
    for llm in engines.values():  # warm-up
        one_run(llm, running, prompt)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            runs[name].append(one_run(llm, running, prompt))
    ours, theirs = medians(runs["chunked"]), medians(runs["whole"])
    result = {
        **machine(chunked.config.device),
        "repeats": args.repeats,
        "running": args.running,
        "prompt_tokens": args.prompt_tokens,
        "budget": chunked.config.max_num_batched_tokens,
        **{f"chunked_{key}": value for key, value in ours.items()},
        **{f"whole_{key}": value for key, value in theirs.items()},
        "stall_ratio": round(theirs["stall_s"] / ours["stall_s"], 2),
        "prompt_ttft_ratio": round(ours["prompt_ttft_s"] / theirs["prompt_ttft_s"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
