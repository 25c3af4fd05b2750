"""Answers over separately loaded documents, in every mode, against `exact`.

Each case is 3-4 passages of real prose (paragraphs of Python's own reference manual,
`pydoc_data.topics`, which ships with every Python), 150-500 tokens each, unless
`--passages` and `--passage-tokens` say otherwise, loaded one by one (each computed alone
after the model's opening), with one made-up fact planted in the first, middle or last
passage. A case is kept only if HF transformers answers its question from that passage
alone. For each mode: fact accuracy, teacher-forced KL against `exact` along `exact`'s
answer, top-1 agreement, time to first token, decode speed, and which cases it answers
(`right`, one digit per case, so that runs compare case by case: with `--dtype`, say).
HF, which picks the cases, stays in float32: every dtype gets the same cases. A fixed
4-document case then compares decode and prefill over stored chunks with the same tokens as
one timeline.

Prints one JSON object last; the goals are in the README.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from dataclasses import dataclass
from pydoc_data.topics import topics

import torch

from kvchunks.bench import scratch_dir, token_range
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.service.context_manager import ContextManager
from kvchunks.vocabulary import DEFAULT_RECOMPUTE

# (sentence planted in a passage, question, word the answer must contain)
FACTS = [
    (
        "The archive key is kept by a clerk named Ilse Marwick.",
        "Who keeps the archive key?",
        "marwick",
    ),
    (
        "The lighthouse on Vesk Island was painted green in 1931.",
        "What colour was the lighthouse on Vesk Island painted?",
        "green",
    ),
    (
        "The night ferry to Dunmore is called the Grey Heron.",
        "What is the night ferry to Dunmore called?",
        "heron",
    ),
    (
        "The secret code of the old vault is 4817.",
        "What is the secret code of the old vault?",
        "4817",
    ),
    (
        "Professor Okafor keeps seven tortoises in her garden.",
        "How many tortoises does Professor Okafor keep?",
        "seven",
    ),
    (
        "The village of Brenholt grows only purple carrots.",
        "What colour are the carrots grown in Brenholt?",
        "purple",
    ),
    (
        "The captain of the Silver Gull is Marta Oyelaran.",
        "Who is the captain of the Silver Gull?",
        "oyelaran",
    ),
    (
        "The museum in Tallow Bay opens at nine o'clock.",
        "At what time does the museum in Tallow Bay open?",
        "nine",
    ),
    (
        "The dragon statue in the square is made of copper.",
        "What is the dragon statue in the square made of?",
        "copper",
    ),
    (
        "The bakery on Elm Street is owned by Tomas Brandt.",
        "Who owns the bakery on Elm Street?",
        "brandt",
    ),
    (
        "The mountain pass at Kerrow is closed every January.",
        "In which month is the mountain pass at Kerrow closed?",
        "january",
    ),
    (
        "The river Aldane flows into Lake Mirren.",
        "Into which lake does the river Aldane flow?",
        "mirren",
    ),
    (
        "The school choir of Fenwick sings only on Thursdays.",
        "On which day does the school choir of Fenwick sing?",
        "thursday",
    ),
    (
        "The clock tower bell of Ashby is named Old Margaret.",
        "What is the clock tower bell of Ashby named?",
        "margaret",
    ),
    (
        "The library cat in Corran is called Biscuit.",
        "What is the library cat in Corran called?",
        "biscuit",
    ),
    (
        "The first train to Wexmoor leaves at six fifteen.",
        "When does the first train to Wexmoor leave?",
        "six",
    ),
    (
        "The harbour master of Port Caddel is Agnes Thorvald.",
        "Who is the harbour master of Port Caddel?",
        "thorvald",
    ),
    (
        "The oldest oak in Hollin Wood is called the Sleeping Giant.",
        "What is the oldest oak in Hollin Wood called?",
        "giant",
    ),
    (
        "The town hall of Redgate has a blue door.",
        "What colour is the door of the town hall of Redgate?",
        "blue",
    ),
    (
        "The orchard at Linmoor grows only quinces.",
        "Which fruit does the orchard at Linmoor grow?",
        "quince",
    ),
    (
        "The festival of lanterns in Sorrel is held in October.",
        "In which month is the festival of lanterns in Sorrel held?",
        "october",
    ),
    (
        "The ferryman of the Kell crossing owns a dog named Pepper.",
        "What is the name of the dog of the ferryman of the Kell crossing?",
        "pepper",
    ),
    (
        "The glassworks in Amberley employs forty-two people.",
        "How many people does the glassworks in Amberley employ?",
        "forty",
    ),
    (
        "The fountain in Castell Square is made of marble.",
        "What is the fountain in Castell Square made of?",
        "marble",
    ),
    (
        "The chess club of Norbury meets every Tuesday.",
        "On which day does the chess club of Norbury meet?",
        "tuesday",
    ),
    (
        "The mayor of Quillon is a former pilot named Ruth Okonkwo.",
        "Who is the mayor of Quillon?",
        "okonkwo",
    ),
    (
        "The old mill at Farrow Creek grinds only rye.",
        "Which grain does the old mill at Farrow Creek grind?",
        "rye",
    ),
    (
        "The weather vane on Tolbeck church is shaped like a fox.",
        "What shape is the weather vane on Tolbeck church?",
        "fox",
    ),
    (
        "The password of the Linden Society is Juniper.",
        "What is the password of the Linden Society?",
        "juniper",
    ),
    (
        "The bridge at Saltmarsh was built by Edwin Callow.",
        "Who built the bridge at Saltmarsh?",
        "callow",
    ),
    (
        "The tallest tower in Vantor has eighty steps.",
        "How many steps does the tallest tower in Vantor have?",
        "eighty",
    ),
]
PLACES = ("first", "middle", "last")
FIXED_QUESTION = (
    "Read the four passages above again, then say in two short sentences which rule of the "
    "Python language each of them describes, and which of those rules matters most."
)


@dataclass
class Case:
    passages: list[str]
    target: int
    question: str
    answer_word: str


def paragraphs() -> list[str]:
    """Prose paragraphs of the reference manual: no code, no tables, whole sentences."""
    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(line.strip() for line in block.splitlines())
            prose = block[:1].isalpha() and not re.search(r"[{}\[\]=>|*`]|\s{3}|::", block)
            if prose and len(text) > 200 and text.endswith("."):
                out.append(text)
    return out


def passages(tokenizer, low: int, high: int) -> list[str]:
    """Consecutive prose paragraphs joined into passages of low..high tokens."""
    out, current = [], ""
    for paragraph in paragraphs():
        joined = f"{current}\n\n{paragraph}" if current else paragraph
        if len(tokenizer.encode(joined)) > high:
            current = paragraph if len(tokenizer.encode(paragraph)) <= high else ""
            continue
        current = joined
        if len(tokenizer.encode(current)) >= low:
            out.append(current)
            current = ""
    return out


def plant(passage: str, fact: str) -> str:
    """The fact inserted at the sentence boundary nearest the passage's middle."""
    cuts = [m.end() for m in re.finditer(r"\. ", passage)]
    if not cuts:
        return f"{passage} {fact}"
    cut = min(cuts, key=lambda c: abs(c - len(passage) // 2))
    return f"{passage[:cut]}{fact} {passage[cut:]}"


def candidate_cases(
    tokenizer, rng: random.Random, low: int, high: int, per_case: int | None
) -> list[Case]:
    """One case per fact: `per_case` passages each, or 3 and 4 in turn."""
    every, pool = passages(tokenizer, low, high), []
    cases = []
    for i, (fact, question, word) in enumerate(FACTS):
        count = per_case or 3 + i % 2
        chosen: list[str] = []
        while len(chosen) < count:
            if not pool:  # long passages are few: once all are used, cases share them
                pool = [p for p in every if p not in chosen]
                rng.shuffle(pool)
            chosen.append(pool.pop())
        place = PLACES[i % 3]
        target = {"first": 0, "middle": count // 2, "last": count - 1}[place]
        chosen[target] = plant(chosen[target], fact)
        cases.append(Case(chosen, target, question, word))
    return cases


def hf_answer(hf, cm: ContextManager, passage: str, question: str, max_tokens: int) -> str:
    """HF transformers' greedy answer with only the fact's passage as context."""
    ids = cm.store.model.chat.frame("system", passage) + cm.store.model.chat.prompt(question)
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=2
        )
    return cm.store.model.decode(out[0, len(ids) :].tolist())


def teacher_forced(cm: ContextManager, question: str, answer: list[int], mode, recompute):
    """Log-probabilities along `answer` after the question, over the active chunks."""
    store = cm.store
    active = store.registry.get_many(store.registry.active(cm.context_name))
    prompt = store.model.chat.prompt(question)
    ctx = store.composer.context_of(active, mode, recompute)
    try:
        with store.lock:
            store.tiers.make_room(
                store.model.llm.block_manager.blocks_needed(0, len(prompt + answer))
            )
            result = store.model.llm.prefill(prompt + answer, ctx.segments, ctx.position, True)
        store.tiers.free([result.segment])
    finally:
        store.composer.release(ctx)
    return torch.log_softmax(result.logits[len(prompt) - 1 : -1], dim=-1)


def run_case(cm: ContextManager, case: Case, settings, params) -> dict:
    cm.clear()
    for text in case.passages:
        cm.activate_chunk(cm.add_chunk(text).hash)
    exact = cm.generate(case.question, params, mode="exact")
    reference = teacher_forced(cm, case.question, exact.token_ids, "exact", None)
    rows = {}
    for name, mode, recompute in settings:
        g = exact if name == "exact" else cm.generate(case.question, params, mode, None, recompute)
        logp = teacher_forced(cm, case.question, exact.token_ids, g.mode, g.recompute)
        kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
        rows[name] = {
            "correct": case.answer_word in g.text.lower(),
            "kl": kl,
            "top1": (logp.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "ttft": g.ttft_s,
            "decode": g.tokens_per_s,
            "recomputed": g.tokens_recomputed,
        }
    return rows


def second_question(cm: ContextManager, case: Case, params) -> tuple[float, float]:
    """TTFT of a new question over the composition made by the first, against reuse's."""
    again = f"Please answer briefly. {case.question}"
    default = cm.generate(again, params)
    assert default.tokens_recomputed == 0, "the composition was computed again"
    reuse = cm.generate(again, params, mode="reuse")
    return default.ttft_s, reuse.ttft_s


def fixed_case(cm: ContextManager, docs: list[str], question: str, decode_tokens: int) -> dict:
    """Decode speed and a fresh question's TTFT over 4 stored documents against the same
    tokens stored as one timeline (one chunk)."""
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    cm.clear()
    chunks = [cm.add_chunk(text) for text in docs]
    tokens = [t for c in chunks for t in c.token_ids]
    whole, _ = cm.store.maker.compute(tokens, [], "reuse", role="raw", kind="input")
    out: dict[str, list[float]] = {}
    for run in range(3):
        asked = f"{question} (run {run})"
        cm.clear()
        cm.activate_chunk(whole.hash)
        timeline = cm.generate(asked, params, mode="exact")
        cm.clear()
        for c in chunks:
            cm.activate_chunk(c.hash)
        reuse = cm.generate(asked, params, mode="reuse")
        realign = cm.generate(asked, params, mode="realign")
        realign_again = cm.generate(f"{asked}!", params, mode="realign")  # composition kept
        out.setdefault("timeline_decode", []).append(timeline.tokens_per_s)
        out.setdefault("reuse_decode", []).append(reuse.tokens_per_s)
        out.setdefault("realign_decode", []).append(realign_again.tokens_per_s)
        out.setdefault("timeline_ttft", []).append(timeline.ttft_s)
        out.setdefault("reuse_ttft", []).append(reuse.ttft_s)
        out.setdefault("realign_first_ttft", []).append(realign.ttft_s)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        "tokens": len(tokens),
        **{k: round(v, 4) for k, v in med.items()},
        "reuse_decode_vs_exact": round(med["reuse_decode"] / med["timeline_decode"], 3),
        "realign_decode_vs_exact": round(med["realign_decode"] / med["timeline_decode"], 3),
        "reuse_ttft_vs_contiguous": round(med["reuse_ttft"] / med["timeline_ttft"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=len(FACTS), help="cases to keep, at most")
    parser.add_argument("--fractions", default="0,0.05,0.15,0.3", help="realign recompute")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument(
        "--passage-tokens", type=token_range, default=(150, 500), help="MIN-MAX per passage"
    )
    parser.add_argument("--passages", type=int, default=None, help="per case (default 3 or 4)")
    parser.add_argument("--dtype", default="float32", help="the engine's; HF's stays float32")
    parser.add_argument("--smoke", action="store_true", help="one case, tiny sizes (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.fractions, args.max_tokens, args.decode_tokens = 1, "0", 4, 4

    from transformers import AutoModelForCausalLM

    config = EngineConfig(kv_cache_bytes=1 << 30, dtype=args.dtype)
    cm = ContextManager(home=scratch_dir("bench-fidelity"), engine_config=config)
    tok = cm.store.model.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(cm.store.model.llm.path, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    fractions = [float(f) for f in args.fractions.split(",")]
    if DEFAULT_RECOMPUTE not in fractions:
        fractions.append(DEFAULT_RECOMPUTE)
    default = f"realign_{DEFAULT_RECOMPUTE:g}"
    settings = [("exact", "exact", None), ("reuse", "reuse", None)]
    # The default's row asks with no mode at all, as a user does.
    settings += [
        (f"realign_{f:g}", None, None)
        if f == DEFAULT_RECOMPUTE
        else (f"realign_{f:g}", "realign", f)
        for f in fractions
    ]

    kept, rows, seconds, skipped = [], [], [], 0
    for case in candidate_cases(tok, random.Random(0), *args.passage_tokens, args.passages):
        if len(kept) == args.cases:
            break
        alone = hf_answer(hf, cm, case.passages[case.target], case.question, args.max_tokens)
        if case.answer_word not in alone.lower() and not args.smoke:
            skipped += 1
            continue
        kept.append(case)
        rows.append(run_case(cm, case, settings, params))
        if len(seconds) < 3:
            seconds.append(second_question(cm, case, params))
    fixed_low = 150 if args.smoke else 420
    fixed = fixed_case(cm, passages(tok, fixed_low, 500)[:4], FIXED_QUESTION, args.decode_tokens)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(float(r[name][key]) for r in rows)

    def count(right: str, wrong: str) -> int:
        """Cases `right` answers and `wrong` does not: accuracies alone hide which."""
        return sum(r[right]["correct"] and not r[wrong]["correct"] for r in rows)

    summary = {
        name: {
            "acc": round(mean(name, "correct"), 3),
            "kl_tf": round(mean(name, "kl"), 4),
            "top1": round(mean(name, "top1"), 3),
            "ttft_s": round(mean(name, "ttft"), 3),
            "decode_tok_s": round(mean(name, "decode"), 2),
            "recomputed_tokens": round(mean(name, "recomputed"), 1),
            "lost_vs_exact": count("exact", name),
            "gained_vs_exact": count(name, "exact"),
            # which cases it answers, in case order: runs compare case by case with it
            "right": "".join("1" if r[name]["correct"] else "0" for r in rows),
        }
        for name, _, _ in settings
    }
    summary["default"] = summary[default]
    exact_acc = summary["exact"]["acc"]
    second_default = statistics.median(s[0] for s in seconds)
    second_reuse = statistics.median(s[1] for s in seconds)
    print(
        json.dumps(
            {
                "cases": len(kept),
                "passage_tokens": args.passage_tokens,
                "passages_per_case": [len(c.passages) for c in kept],
                "skipped_cases": skipped,
                "context_tokens": [sum(len(tok.encode(p)) for p in c.passages) for c in kept],
                "default_recompute": DEFAULT_RECOMPUTE,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "per_mode": summary,
                "default_acc_vs_exact": round(summary["default"]["acc"] / exact_acc, 3)
                if exact_acc
                else None,
                "exact_ttft_vs_default": round(
                    summary["exact"]["ttft_s"] / summary["default"]["ttft_s"], 2
                ),
                "kl_tf_default": summary["default"]["kl_tf"],
                "second_question_ttft_s": round(second_default, 4),
                "second_question_ttft_vs_reuse": round(second_default / second_reuse, 3),
                **fixed,
            }
        )
    )
    cm.close()


if __name__ == "__main__":
    main()
