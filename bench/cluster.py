"""The Ray actor layer on a local two-worker cluster.

1. activate_chunk's round trip through the client handle (median of --repeats), for a
   client of the router (the default: an activation goes to the worker its context last
   used, with no routing lookup on its path; the prefetch it starts runs on the worker the
   router picks) and for a client pinned to one worker.
2. Time to first token on worker B for --tokens tokens of chunks computed on worker A:
   their KV shipped from A through the object store, against B computing chunks of the
   same sizes itself (new documents: what it would do without the shared pool; the shared
   files of A's chunks are not touched). Measured at the client, from the first load (B
   computing) or the first activation (shipped) to the first token streamed back; the
   median of --ttft-repeats runs of each.
3. The same with A's chunks moved out of its pool into the node's HostStore (what an
   eviction does): B loads them from host memory (`host_load_vs_recompute`).

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import ray

from kvchunks.actors import service
from kvchunks.actors.client import Client, connect
from kvchunks.actors.remote import NAMESPACE
from kvchunks.bench import scratch_dir
from kvchunks.engine import SamplingParams
from kvchunks.engine.checkpoint import resolve_model

WORDS = [
    "river",
    "stone",
    "lantern",
    "harbour",
    "meadow",
    "copper",
    "violin",
    "orchard",
    "glacier",
    "compass",
    "ember",
    "thistle",
    "falcon",
    "quarry",
    "saffron",
    "tundra",
    "beacon",
    "willow",
    "marble",
    "cinder",
]


def document(i: int, tokens: int, tokenizer) -> str:
    """A deterministic text of about `tokens` tokens, different for each i."""
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(tokens * 2)]
    text = f"Document {i}: " + " ".join(words)
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[: tokens - 8])


def activate_rtt_ms(client: Client, chunk_hash: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        client.deactivate_chunk(chunk_hash)
        start = time.perf_counter()
        client.activate_chunk(chunk_hash)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def ttft_s(client: Client, documents: Callable[[], list[str]], prompt: str) -> tuple:
    """From the start of `documents()` (which gives the hashes to activate) to the first answer
    token back at the client; and those hashes."""
    first: list[float] = []
    start = time.perf_counter()
    hashes = documents()
    for h in hashes:
        client.activate_chunk(h)
    params = SamplingParams(temperature=0, max_tokens=1)
    client.generate(prompt, params, "realign", on_text=lambda _: first.append(time.perf_counter()))
    return (first[0] if first else time.perf_counter()) - start, hashes


def ttft_on_b(b, on_b: Client, name: str, documents: Callable, keep: set, repeats: int) -> tuple:
    """Median over `repeats` runs, each in a new context with a new question, and each with
    B starting over with nothing (A still holds its chunks); and B's counters per run.
    `documents(run, client)` gives the hashes to activate. Each run's question and answer,
    and the documents it made (not in `keep`), are deleted after it, so that the next run's
    activations do not prefetch them as the documents' children."""
    times, before = [], ray.get(b.status.remote())["stats"]
    for i in range(repeats):
        ray.get(b.evict.remote())
        client = on_b.with_context(f"bench-{name}-{i}")
        prompt = f"Question {name} {i}: what is this text about?"
        took, hashes = ttft_s(client, lambda c=client, i=i: documents(i, c), prompt)
        times.append(took)
        client.delete_chunk(client.last_generation.output_chunk.hash)
        client.delete_chunk(client.last_generation.prompt_chunk.hash)
        for h in hashes:
            if h not in keep:
                client.delete_chunk(h)
    after = ray.get(b.status.remote())["stats"]
    per_run = {k: (after.get(k, 0) - before.get(k, 0)) / repeats for k in ("recomputes", "shipped")}
    return statistics.median(times), per_run


SMOKE = {"tokens": 128, "chunks": 2, "repeats": 5, "ttft_repeats": 1, "kv_cache_mb": 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="context tokens on worker B")
    parser.add_argument("--chunks", type=int, default=4, help="chunks they are split into")
    parser.add_argument("--repeats", type=int, default=200, help="activate_chunk round trips")
    parser.add_argument("--ttft-repeats", type=int, default=3, help="for each TTFT (median)")
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="each worker's KV pool")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    model = resolve_model(None)
    ray.init("local", num_cpus=4, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    running = service.start(
        2,
        model=model,
        home=scratch_dir("bench-cluster"),
        engine_options={"kv_cache_bytes": args.kv_cache_mb << 20},
        detached=False,
    )
    a, b = running.workers["worker-0"], running.workers["worker-1"]
    try:
        on_a = connect("auto", "bench-a", worker="worker-0")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        per_chunk = args.tokens // args.chunks
        started = time.perf_counter()
        chunks = [on_a.add_chunk(document(i, per_chunk, tokenizer)) for i in range(args.chunks)]
        create_s = time.perf_counter() - started
        hashes = [c.hash for c in chunks]
        routed = activate_rtt_ms(connect("auto", "bench-rtt"), hashes[0], args.repeats)
        pinned = activate_rtt_ms(on_a.with_context("bench-rtt-pinned"), hashes[0], args.repeats)

        on_b = connect("auto", "bench-b", worker="worker-1")
        # Warm both paths once on B (first prefill, first transfer), then start B over.
        on_b.add_chunk("A short warm-up chunk computed on B.")
        on_b.populate(on_a.add_chunk("A short warm-up chunk shipped from A.").hash)

        def computed_on_b(run: int, client: Client) -> list[str]:
            first = args.chunks * (run + 1)  # documents no run has seen: B computes them
            texts = [document(first + j, per_chunk, tokenizer) for j in range(args.chunks)]
            return [client.add_chunk(text).hash for text in texts]

        keep = set(hashes)
        recompute, computed = ttft_on_b(
            b, on_b, "recompute", computed_on_b, keep, args.ttft_repeats
        )
        ship, shipped = ttft_on_b(
            b, on_b, "ship", lambda run, client: hashes, keep, args.ttft_repeats
        )
        for h in hashes:  # out of A's pool, into the node's HostStore
            on_a.move_to_cpu(h)
        moves = ray.get(running.tiers.transfers.remote())
        host, from_host = ttft_on_b(
            b, on_b, "host", lambda run, client: hashes, keep, args.ttft_repeats
        )
        host_loads = ray.get(running.tiers.transfers.remote()).get("from_host", 0)
        host_loads -= moves.get("from_host", 0)
        threads = ray.get(a.status.remote())["threads"]
    finally:
        service.stop()
        ray.shutdown()
    result = {
        "bench": "cluster",
        "workers": 2,
        "threads_per_worker": threads,
        "context_tokens": sum(c.token_count for c in chunks),
        "chunks": len(chunks),
        "create_on_a_s": round(create_s, 3),
        "activate_rtt_ms": round(routed, 3),
        "activate_rtt_pinned_ms": round(pinned, 3),
        "activate_rtt_goal_ms": 5,
        "ttft_recompute_s": round(recompute, 3),
        "ttft_ship_s": round(ship, 3),
        "ship_ratio": round(recompute / ship, 2),
        "ship_ratio_goal": 10,
        "shipped_while_computing_per_run": computed["shipped"],
        "shipped_per_run": shipped["shipped"],
        "recomputed_while_shipping_per_run": shipped["recomputes"],
        "ttft_host_s": round(host, 3),
        "host_load_vs_recompute": round(recompute / host, 2),
        "host_load_vs_recompute_goal": 10,
        "host_loads_per_run": host_loads / args.ttft_repeats,
        "recomputed_while_loading_from_host_per_run": from_host["recomputes"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
