"""Time to first token with stored document KV active against HF transformers prefilling
the same full text, in one run; and the cost of toggling a chunk.

Documents loaded one by one are not one timeline, so each mode computes something else
than HF's full prefill: `reuse` attends to them as stored (nothing recomputed), the
default `realign` recomputes a fraction of them once per composition. Next to each speed,
the run reports how often that mode's greedy answer equals HF's on the same tokens.

Prints one JSON object last: ttft_s and ttft_ratio (reuse; HF over ours), their
agreement, the default mode's first and later TTFT and agreement, toggle_ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from kvchunks.bench import scratch_dir
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
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


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, ids.shape[1] :].tolist()


def agreement(runs: list[tuple[float, bool]]) -> float:
    """The fraction of questions whose greedy answer equals HF's, token for token."""
    return round(sum(same for _, same in runs) / len(runs), 3)


def median_toggle(cm: ContextManager, text: str, repeats: int) -> float:
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
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.docs, args.doc_tokens, args.repeats, args.toggle_tokens = 2, 64, 2, 64
        args.answer_tokens = 2

    from transformers import AutoModelForCausalLM

    home = scratch_dir("bench-reuse")
    cm = ContextManager(home=home / "a", engine_config=EngineConfig(kv_cache_bytes=1 << 30))
    llm, rng = cm.store.model.llm, random.Random(0)
    device = llm.config.device  # HF runs where the engine does
    hf = AutoModelForCausalLM.from_pretrained(llm.path, dtype=torch.float32).eval().to(device)
    docs = [cm.add_chunk(document(rng, llm.tokenizer, args.doc_tokens)) for _ in range(args.docs)]
    for doc in docs:
        cm.activate_chunk(doc.hash)
    # What the model reads before the question: the opening, then the documents.
    context_ids = cm.store.model.chat.opening + [t for d in docs for t in d.token_ids]
    answer = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)

    ours, theirs, default = [], [], []
    for _ in range(args.repeats):
        q = question(rng, llm.tokenizer, args.question_tokens)
        ids = torch.tensor([context_ids + cm.store.model.chat.prompt(q)], device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            hf(ids, logits_to_keep=1).logits.argmax(-1)
        theirs.append(time.perf_counter() - start)
        expected = hf_greedy(hf, ids, args.answer_tokens)
        reuse = cm.generate(q, answer, mode="reuse")
        ours.append((reuse.ttft_s, reuse.token_ids == expected))
        realigned = cm.generate(q, answer)  # the default mode
        default.append((realigned.ttft_s, realigned.token_ids == expected))

    text = document(rng, llm.tokenizer, args.toggle_tokens)
    toggle_repeats = 20 if args.smoke else 200
    toggle = median_toggle(cm, text, toggle_repeats)
    # The same with Redis fsyncing once a second instead of on every write.
    os.environ[FSYNC_ENV] = "everysec"
    relaxed = ContextManager(store=ChunkStore(home=home / "b", llm=llm))
    toggle_everysec = median_toggle(relaxed, text, toggle_repeats)

    ttft, hf_ttft = statistics.median(t for t, _ in ours), statistics.median(theirs)
    later = statistics.median(t for t, _ in default[1:]) if len(default) > 1 else None
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
                "answer_tokens": args.answer_tokens,
                "agreement_with_hf": agreement(ours),
                "default_first_ttft_s": round(default[0][0], 4),
                "default_later_ttft_s": later and round(later, 4),
                "default_agreement_with_hf": agreement(default),
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
