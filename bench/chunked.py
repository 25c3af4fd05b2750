"""What a long prompt or document costs the answers already running, with chunked prefill
and without.

Some answers are decoding when a long prompt arrives (a request through the scheduler), or
when a document of the same length is loaded (its KV computed directly, as `load` does).
With chunked prefill (the device's default step budget) either is computed in pieces, and
the running answers take a step between pieces; the competitor, in the same run, is the same
engine computing it in one pass (a budget as large as the prompt), as it did before chunking.
Per run: `stall_s`, the longest wait of a running answer for its next token, from the
arrival until the prompt's first token or the document's KV; `time_s`, that span (the
prompt's time to first token, the document's load); `tokens_meanwhile`, the tokens each
running answer got in it. Medians of --repeats runs, the engines in turn, after a warm-up.
Prints one JSON object last.
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

SMOKE = {"running": 2, "tokens": 96, "budget": 32, "repeats": 1}


def one_run(llm: LLM, running: list[list[int]], tokens: list[int], kind: str) -> dict:
    answers = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    seqs = [llm.add_request(ids, answers) for ids in running]
    try:
        while min(s.num_completion_tokens for s in seqs) < 2:  # every answer decoding
            llm.step()
        counts = [s.num_completion_tokens for s in seqs]
        arrived = time.perf_counter()
        came = [arrived]  # when a running answer's token was seen, between layers

        def watch(_done: int, _layers: int) -> None:
            if seqs[0].num_completion_tokens > counts[0] + len(came) - 1:
                came.append(time.perf_counter())

        with llm.layer_progress(watch):
            if kind == "prompt":
                prompt = llm.add_request(tokens, SamplingParams(temperature=0, max_tokens=1))
                while not prompt.num_completion_tokens:
                    llm.step()
            else:
                llm.release(llm.prefill(tokens).segment)
        came.append(time.perf_counter())
        meanwhile = min(s.num_completion_tokens - n for s, n in zip(seqs, counts, strict=True))
    finally:
        for seq in seqs:
            llm.abort(seq)
        while not llm.scheduler.is_finished():
            llm.step()
    stall = max(b - a for a, b in zip(came, came[1:], strict=False))
    return {"stall_s": stall, "time_s": came[-1] - arrived, "tokens_meanwhile": meanwhile}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default model if unset)")
    parser.add_argument("--running", type=int, default=8, help="answers decoding meanwhile")
    parser.add_argument("--tokens", type=int, default=2048, help="the prompt's, the document's")
    parser.add_argument("--budget", type=int, default=None, help="step budget (device default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    path = resolve_model(args.model)
    seqs = args.running + 1
    chunked = LLM(path, EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=args.budget))
    whole_budget = args.tokens + args.running
    whole = LLM(path, EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=whole_budget))
    whole.runner.model = chunked.runner.model  # one copy of the weights
    rng = random.Random(0)
    running = [[rng.randrange(100, 49000) for _ in range(64)] for _ in range(args.running)]
    tokens = [rng.randrange(100, 49000) for _ in range(args.tokens)]
    engines = {"chunked": chunked, "whole": whole}
    cases = [(name, kind) for kind in ("prompt", "document") for name in engines]
    for name, kind in cases:  # warm-up
        one_run(engines[name], running, tokens, kind)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for name, kind in cases:
            runs[name, kind].append(one_run(engines[name], running, tokens, kind))
    result = {
        **machine(chunked.config.device),
        "repeats": args.repeats,
        "running": args.running,
        "tokens": args.tokens,
        "budget": chunked.config.max_num_batched_tokens,
    }
    for kind in ("prompt", "document"):
        ours, theirs = medians(runs["chunked", kind]), medians(runs["whole", kind])
        result |= {f"{kind}_chunked_{key}": value for key, value in ours.items()}
        result |= {f"{kind}_whole_{key}": value for key, value in theirs.items()}
        result[f"{kind}_stall_ratio"] = round(theirs["stall_s"] / ours["stall_s"], 2)
        result[f"{kind}_time_ratio"] = round(ours["time_s"] / theirs["time_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
