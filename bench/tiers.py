"""Tier moves against raw copies of the same bytes, and time to first token with the active
chunks resident in each tier against HF transformers prefilling the same text, in one run.

Prints one JSON object last: bandwidths in GB/s with their raw baselines and ratios
(`bw_ratio_min`), and TTFT per tier with `ttft_disk_ratio` (HF over ours, disk-resident).

disk -> cpu is `move_to_cpu` of an archived chunk against a plain read of the same bytes, both
files dropped from the page cache before each read. The same moves with the files in the page
cache are reported as `disk_to_cpu_cached_*`, outside `bw_ratio_min`: there the SHA-256 check
that every load makes bounds a read. Likewise the disk TTFT (`ttft_disk_s`) drops the chunk
files from the page cache before each run; `ttft_disk_cached_s` reads them from it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from kvchunks.bench import scratch_dir
from kvchunks.bench.reuse import document, question
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.service.context_manager import ContextManager
from kvchunks.store.kv_file import kv_path, write_kv_file


def best(fn, repeats: int) -> float:
    """Fastest of several runs, in seconds: bandwidth is about what the path can do. (Memory
    copies run in blocks: taken in turn, each side's buffers would land where the other's were
    just freed.)"""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_pairs(
    ours, raw, paths: tuple[Path, Path], repeats: int, cold: bool, before_ours=lambda: None
) -> tuple:
    """Fastest of several runs of a file operation, ours and the raw one on its own file taken
    in turn (the disk's speed drifts). `cold` drops the file from the page cache first."""
    times = []
    for _ in range(repeats):
        before_ours()
        times.append((timed(ours, paths[0], cold), timed(raw, paths[1], cold)))
    return min(t for t, _ in times), min(t for _, t in times)


def timed(fn, path: Path, cold: bool) -> float:
    if cold:
        drop_from_page_cache(path)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_from_page_cache(path: Path) -> None:
    """The next read of the file comes from the disk (written pages are synced first: the
    kernel drops only clean ones)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def bandwidths(cm: ContextManager, chunk, file_repeats: int, move_repeats: int) -> dict:
    store = cm.store
    k, v = store.model.llm.read_kv(store.composer.segments(chunk))
    nbytes = k.nbytes + v.nbytes
    gb = nbytes / 1e9
    raw_bytes = k.cpu().numpy().tobytes() + v.cpu().numpy().tobytes()
    paths = (kv_path(store.home, chunk.hash), scratch_dir("bench-tiers-raw") / "raw.bin")
    record = chunk.to_record() | {"segments": [], "is_active": False}

    def to_cpu():
        cm.move_to_gpu(chunk.hash)
        start = time.perf_counter()
        cm.move_to_cpu(chunk.hash)
        return time.perf_counter() - start

    def to_gpu():
        cm.move_to_cpu(chunk.hash)
        start = time.perf_counter()
        cm.move_to_gpu(chunk.hash)
        return time.perf_counter() - start

    def read_raw():
        return paths[1].read_bytes()

    def disk_to_cpu(cold: bool) -> tuple:
        return best_of_pairs(
            lambda: cm.move_to_cpu(chunk.hash),
            read_raw,
            paths,
            file_repeats,
            cold,
            before_ours=lambda: cm.archive_to_disk(chunk.hash),
        )

    raw_write(paths[1], raw_bytes)
    figures = {
        "gpu_to_cpu": (
            min(to_cpu() for _ in range(move_repeats)),
            best(lambda: (k.clone(), v.clone()), move_repeats),
        ),
        "cpu_to_gpu": (
            min(to_gpu() for _ in range(move_repeats)),
            best(lambda: (k.clone(), v.clone()), move_repeats),
        ),
        "cpu_to_disk": best_of_pairs(
            lambda: write_kv_file(paths[0], k, v, record, store.model.fingerprint),
            lambda: raw_write(paths[1], raw_bytes),
            paths,
            file_repeats,
            cold=False,
        ),
        "disk_to_cpu": disk_to_cpu(cold=True),
    }
    cached = {"disk_to_cpu_cached": disk_to_cpu(cold=False)}
    cm.move_to_gpu(chunk.hash)
    out = {"moved_bytes": nbytes}
    for name, (ours, raw) in (figures | cached).items():
        out[f"{name}_gb_s"] = round(gb / ours, 3)
        out[f"raw_{name}_gb_s"] = round(gb / raw, 3)
        out[f"{name}_ratio"] = round(raw / ours, 3)
    out["bw_ratio_min"] = min(out[f"{name}_ratio"] for name in figures)
    return out


def placements(cm: ContextManager, chunks: list) -> dict:
    """Per TTFT row: the tier the active chunks are in, and how to put them there."""
    files = [kv_path(cm.store.home, c.hash) for c in chunks]

    def to(move, then=lambda path: None):
        def place() -> None:
            for c in chunks:
                move(c.hash)
            for path in files:
                then(path)

        return place

    return {
        "gpu": ("gpu", to(cm.move_to_gpu)),
        "cpu": ("cpu", to(cm.move_to_cpu)),
        "disk": ("disk", to(cm.archive_to_disk, drop_from_page_cache)),
        "disk_cached": ("disk", to(cm.archive_to_disk, Path.read_bytes)),
    }


def ttft_by_tier(cm: ContextManager, chunks: list, rng, args) -> dict[str, float]:
    """Median time to first token of a new question with the chunks active in each tier."""
    llm, one = cm.store.model.llm, SamplingParams(temperature=0, max_tokens=1)
    out = {}
    for row, (tier, place) in placements(cm, chunks).items():
        times = []
        for _ in range(args.repeats):
            place()
            assert all(cm.get_chunk(c.hash).tier == tier for c in chunks)
            ask = question(rng, llm.tokenizer, args.question_tokens)
            times.append(cm.generate(ask, one).ttft_s)
        out[row] = statistics.median(times)
    return out


def hf_ttft(hf, cm: ContextManager, context_ids: list[int], rng, args) -> float:
    """HF prefilling the same context and a question of the same length: the median."""
    llm, times = cm.store.model.llm, []
    for _ in range(args.repeats):
        ask = cm.store.model.chat.prompt(question(rng, llm.tokenizer, args.question_tokens))
        ids = torch.tensor([context_ids + ask], device=llm.config.device)
        start = time.perf_counter()
        with torch.inference_mode():
            hf(ids, logits_to_keep=1).logits.argmax(-1).item()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SMOKE = {
    "context_tokens": 256,
    "chunks": 2,
    "question_tokens": 8,
    "repeats": 1,
    "move_repeats": 2,
    "file_repeats": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="for time to first token")
    parser.add_argument("--move-repeats", type=int, default=30, help="for gpu <-> cpu moves")
    parser.add_argument("--file-repeats", type=int, default=10, help="for disk moves")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    from transformers import AutoModelForCausalLM

    cm = ContextManager(
        home=scratch_dir("bench-tiers"), engine_config=EngineConfig(kv_cache_bytes=1 << 30)
    )
    cm.configure(auto_activate=False)
    llm, rng = cm.store.model.llm, random.Random(1)
    per_chunk = args.context_tokens // args.chunks - 6  # the system framing adds ~6 tokens
    chunks = [cm.add_chunk(document(rng, llm.tokenizer, per_chunk)) for _ in range(args.chunks)]
    for c in chunks:
        cm.activate_chunk(c.hash)
    cm.store.wait_for_transfers()
    result = bandwidths(cm, chunks[0], args.file_repeats, args.move_repeats)

    hf = AutoModelForCausalLM.from_pretrained(llm.path, dtype=llm.config.torch_dtype).eval()
    hf.to(llm.config.device)
    ttft = ttft_by_tier(cm, chunks, rng, args)
    context_ids = [t for c in chunks for t in c.token_ids]
    theirs = hf_ttft(hf, cm, context_ids, rng, args)
    for row, ours in ttft.items():
        result[f"ttft_{row}_s"] = round(ours, 4)
        result[f"ttft_{row}_ratio"] = round(theirs / ours, 2)
    result["hf_ttft_s"] = round(theirs, 4)
    result["context_tokens"] = len(context_ids)
    result["device"] = llm.config.device
    cm.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
