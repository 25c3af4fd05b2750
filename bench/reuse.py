"""Time to first token with stored document KV active (reuse mode) against HF transformers
prefilling the same full text, in one run; and the cost of toggling a chunk.

Prints one JSON object last: ttft_s, hf_ttft_s, ttft_ratio (HF over ours), toggle_ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import torch

from kvchunks.actors.chunk_store import ChunkStore
from kvchunks.actors.context_manager import ContextManager
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.store.redis_server import FSYNC_ENV

WORDS = [
    "river",
    "mountain",
    "archive",
    "ledger",
    "harbor",
    "copper",
    "lantern",
    "meadow",
    "orbit",
    "signal",
    "cedar",
    "vessel",
    "quarry",
    "beacon",
    "tundra",
    "saffron",
    "glacier",
    "compass",
    "mosaic",
    "falcon",
    "prairie",
    "granite",
]


def document(rng: random.Random, tokenizer, n_tokens: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(n_tokens * 2))
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:n_tokens])


def question(rng: random.Random, tokenizer, n_tokens: int) -> str:
    text = "Which words appear most often? " + " ".join(rng.choice(WORDS) for _ in range(64))
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:n_tokens])


def median_toggle(cm: ContextManager, text: str, repeats: int = 200) -> float:
    """Median seconds of one activate_chunk + deactivate_chunk pair."""
    chunk = cm.add_chunk(text)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cm.activate_chunk(chunk.hash)
        cm.deactivate_chunk(chunk.hash)
        times.append(time.perf_counter() - start)
    cm.delete_chunk(chunk.hash)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--toggle-tokens", type=int, default=2048)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    cm = ContextManager(home=tempfile.mkdtemp(), engine_config=EngineConfig(kv_cache_bytes=1 << 30))
    llm, rng = cm.store.llm, random.Random(0)
    hf = AutoModelForCausalLM.from_pretrained(llm.path, dtype=torch.float32).eval()
    docs = [cm.add_chunk(document(rng, llm.tokenizer, args.doc_tokens)) for _ in range(args.docs)]
    for doc in docs:
        cm.activate_chunk(doc.hash)
    context_ids = [t for d in docs for t in d.token_ids]
    one = SamplingParams(temperature=0, max_tokens=1)

    ours, theirs = [], []
    for _ in range(args.repeats):
        q = question(rng, llm.tokenizer, args.question_tokens)
        ours.append(cm.generate(q, one).ttft_s)
        ids = torch.tensor([context_ids + cm.store.chat.prompt(q)])
        start = time.perf_counter()
        with torch.inference_mode():
            hf(ids, logits_to_keep=1).logits.argmax(-1)
        theirs.append(time.perf_counter() - start)

    text = document(rng, llm.tokenizer, args.toggle_tokens)
    toggle = median_toggle(cm, text)
    # The same with Redis fsyncing once a second instead of on every write.
    os.environ[FSYNC_ENV] = "everysec"
    relaxed = ContextManager(store=ChunkStore(home=tempfile.mkdtemp(), llm=llm))
    toggle_everysec = median_toggle(relaxed, text)

    ttft, hf_ttft = statistics.median(ours), statistics.median(theirs)
    print(
        json.dumps(
            {
                "device": llm.config.device,
                "threads": torch.get_num_threads(),
                "context_tokens": len(context_ids),
                "question_tokens": args.question_tokens,
                "ttft_s": round(ttft, 4),
                "hf_ttft_s": round(hf_ttft, 4),
                "ttft_ratio": round(hf_ttft / ttft, 2),
                "toggle_chunk_tokens": len(llm.tokenizer.encode(text)),
                "toggle_ms": round(toggle * 1000, 3),
                "toggle_ms_fsync_everysec": round(toggle_everysec * 1000, 3),
            }
        )
    )
    cm.close()
    relaxed.close()


if __name__ == "__main__":
    main()
