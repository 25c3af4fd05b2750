"""The command line's registry-only commands, and the registry operations under them, as the
number of stored chunks grows.

`list_s` is the wall time of `kvchunks list --json` run as a new process with `--list-at`
chunks stored (the embedded Redis started by the command itself, as in everyday use), and
`help_s` that of `kvchunks --help`; each is the median of `--runs` runs, with its range. The
competitor, `manager_list_s`, is the same listing through a ContextManager in a new process,
the path every command took before the catalog: it loads the model's tokenizer and imports
torch and transformers.

Then the cost of `list_chunks`, `get_chunk` by an 8-digit prefix and an activate + deactivate
pair at each of `--scales` stored chunks, through the catalog (ours) and a ContextManager over
the same registry, whose engine is not started (what a chat does before its first prompt).
`growth` is the largest ratio of an operation's cost at the largest scale to its cost at the
smallest, `list_chunks` counted per listed chunk.

Records are put into the registry directly (no model computes them; no KV files): the listing
reads records, never KV.

Last, `packed_fraction`: how many standalone chunks of 20 tokens the default model's pool,
held to `--pack-blocks` blocks by the gpu budget, keeps before the first one moves down a
tier, over the most that its slots could hold (blocks x block size / 20).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvchunks.bench import scratch_dir
from kvchunks.common import HOME_ENV
from kvchunks.engine.checkpoint import prepare_default_model
from kvchunks.policies.budgets import TierBudgets
from kvchunks.service.catalog import Catalog, open_catalog
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
from kvchunks.store.chunk import ChunkRecord
from kvchunks.store.hashing import chunk_hash, content_hash, context_hash, model_fingerprint
from kvchunks.store.redis_server import close, connect_embedded
from kvchunks.store.registry import ChunkRegistry

FINGERPRINT = model_fingerprint("LlamaForCausalLM", "ab" * 32, "float32", 256, [])
WORDS = ("tea", "ferry", "harbour", "vault", "code", "bell", "dawn", "notes", "keeper")
MANAGER_LIST = (
    "import json, sys; from kvchunks import ContextManager; "
    "cm = ContextManager(sys.argv[1], home=sys.argv[2]); "
    "print(json.dumps([c.to_json() for c in cm.list_chunks()])); cm.close()"
)


def record(i: int, rng: random.Random, after: ChunkRecord | None) -> ChunkRecord:
    """A note of 8 to 60 tokens; every tenth continues the one before (a timeline)."""
    tokens = [rng.randrange(1, 49152) for _ in range(rng.randint(8, 60))]
    parents = [after] if after is not None and i % 10 == 0 else []
    position = sum(p.token_count for p in parents)
    return ChunkRecord(
        hash=chunk_hash(
            FINGERPRINT, context_hash([(p.hash, 0) for p in parents]), position, tokens
        ),
        content_hash=content_hash(tokens),
        token_ids=tokens,
        role="user",
        kind="input",
        text=f"note {i}: " + " ".join(rng.choices(WORDS, k=len(tokens) // 2)),
        tags=[f"t{i % 7}"],
        metadata={"source": "text"},
        parent_chunks=[p.hash for p in parents],
        position=position,
        layout="timeline" if parents else "standalone",
    )


def fill(home: Path, upto: int, made: list[ChunkRecord], rng: random.Random) -> None:
    """Store records until there are `upto`."""
    client = connect_embedded(home)
    try:
        registry = ChunkRegistry(client)
        while len(made) < upto:
            chunk = record(len(made), rng, made[-1] if made else None)
            registry.put(chunk, tier="disk")
            made.append(chunk)
    finally:
        close(client)


def wall(command: list[str], runs: int) -> dict:
    """Median wall time of a new process running `command`, with its range, in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def kvchunks_command() -> list[str]:
    """The `kvchunks` script installed next to this interpreter, else its equivalent."""
    script = Path(sys.executable).with_name("kvchunks")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from kvchunks.cli.main import main; main()"]


def walls(model: Path, home: Path, runs: int) -> dict:
    """Wall times of new processes: `kvchunks list --json`, `kvchunks --help`, and the same
    listing through a ContextManager."""
    listing = [*kvchunks_command(), "--model", str(model), "list", "--json"]
    return {
        "list": wall(listing, runs),
        "help": wall([*kvchunks_command(), "--help"], runs),
        "manager_list": wall([sys.executable, "-c", MANAGER_LIST, str(model), str(home)], runs),
    }


def per_call(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of one call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def costs(api: Catalog, made: list[ChunkRecord], repeats: int, rng: random.Random) -> dict:
    """Seconds per list_chunks (and per listed chunk), get_chunk by prefix, and activate +
    deactivate of one chunk, at the current number of stored chunks."""
    picks = iter(rng.choices(made, k=2 * repeats))

    def pair() -> None:
        chunk = next(picks).hash
        api.activate_chunk(chunk)
        api.deactivate_chunk(chunk)

    listed = per_call(api.list_chunks, max(3, repeats // 10))
    return {
        "list_chunks_s": listed,
        "list_chunks_per_chunk_s": listed / len(made),
        "get_chunk_prefix_s": per_call(lambda: api.get_chunk(next(picks).hash[:8]), repeats),
        "activate_deactivate_s": per_call(pair, repeats),
    }


def growth(by_scale: dict[int, dict]) -> dict:
    """Each operation's cost at the largest scale over its cost at the smallest, and the
    largest of those ratios."""
    low, high = by_scale[min(by_scale)], by_scale[max(by_scale)]
    ops = ["list_chunks_per_chunk_s", "get_chunk_prefix_s", "activate_deactivate_s"]
    ratios = {op: high[op] / low[op] for op in ops}
    return {"ratios": ratios, "growth": max(ratios.values())}


def packed_fraction(model: Path, home: Path, blocks: int, tokens: int = 20) -> dict:
    """Standalone chunks of `tokens` tokens added until the first moves out of the pool,
    held to `blocks` blocks: how many stayed, and their share of what the slots hold."""
    store = ChunkStore(
        model, home=home, budgets=TierBudgets(gpu_blocks=blocks), prefetch_policy="explicit"
    )
    try:
        manager = ContextManager(store=store)
        held = 0
        while True:
            manager.add_chunk(f"note {held:0{tokens - 2}d}", role="raw")  # `tokens` tokens
            if store.stats["evictions"]:
                break
            held += 1
        slots = blocks * store.model.llm.pool_usage()["block_size"]
    finally:
        store.close()
    return {"pack_blocks": blocks, "chunks_held": held, "packed_fraction": held / (slots / tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--list-at", type=int, default=1000, help="chunks stored for list_s")
    parser.add_argument("--runs", type=int, default=5, help="new processes per wall time")
    parser.add_argument("--repeats", type=int, default=50, help="calls per operation cost")
    parser.add_argument("--pack-blocks", type=int, default=8, help="pool blocks for packing")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.scales, args.list_at, args.runs, args.repeats = [10, 40], 20, 1, 3
        args.pack_blocks = 1
    rng = random.Random(0)
    model = prepare_default_model()
    home = scratch_dir("bench-cli")
    os.environ[HOME_ENV] = str(home)  # the commands run below work on this data directory
    made: list[ChunkRecord] = []
    result: dict = {"chunks_for_list": args.list_at}

    ours, theirs = {}, {}
    for scale in sorted({*args.scales, args.list_at}):
        fill(home, scale, made, rng)
        if scale == args.list_at:  # no client holds the server: each command starts it
            result |= walls(model, home, args.runs)
        if scale in args.scales:
            catalog, manager = open_catalog(model, home=home), ContextManager(model, home=home)
            try:
                ours[scale] = costs(catalog, made, args.repeats, rng)
                theirs[scale] = costs(manager, made, args.repeats, rng)
            finally:
                manager.close()
                catalog.close()
    result |= {
        "list_s": result["list"]["median"],
        "help_s": result["help"]["median"],
        "manager_list_s": result["manager_list"]["median"],
        "catalog": ours,
        "manager": theirs,
        "manager_growth": growth(theirs)["growth"],
        **growth(ours),
        **packed_fraction(model, home / "packing", args.pack_blocks),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
