"""What temperature, top-k and top-p actually sample, against HF's logits warpers on fixed
logits: the same support, and frequencies within five standard deviations of the reference
probabilities over many seeded draws."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from kvchunks.engine import SamplingParams
from kvchunks.engine.sampler import sample
from kvchunks.engine.sequence import Sequence

# No two equal, and no top-p below lands on a cumulative mass exactly.
LOGITS = torch.tensor([3.0, 2.6, 2.1, 1.3, 1.0, 0.4, -0.5, -1.1, -2.0, -3.2])
DRAWS = 8_000


def reference_probs(params: SamplingParams) -> torch.Tensor:
    """The distribution HF's generate samples from with these settings."""
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    scores = LOGITS[None].clone()
    for warp in warpers:
        scores = warp(None, scores)
    return scores.softmax(-1)[0].double()


def draw(params: SamplingParams, n: int) -> Counter:
    seq = Sequence([0], params)
    return Counter(sample(LOGITS[None], [seq])[0] for _ in range(n))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, 0, 1.0),
        (0.6, 0, 1.0),
        (1.8, 0, 1.0),
        (1.0, 3, 1.0),
        (1.0, 0, 0.75),
        (0.8, 0, 0.5),
        (1.4, 6, 0.9),
        (1.0, 5, 0.6),
    ],
)
def test_sampled_frequencies_follow_the_reference(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=7)
    expected = reference_probs(params)
    counts = draw(params, DRAWS)
    support = {i for i, p in enumerate(expected.tolist()) if p > 0}
    likely = {i for i, p in enumerate(expected.tolist()) if p > 1e-3}
    assert likely <= set(counts) <= support  # nothing outside it, nothing likely missed
    for token, p in enumerate(expected.tolist()):
        sigma = math.sqrt(DRAWS * p * (1 - p))
        assert abs(counts[token] - DRAWS * p) <= 5 * sigma + 1, (token, counts[token], p)


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    for params in (
        SamplingParams(temperature=1.5, top_k=1, seed=1),
        SamplingParams(temperature=1.5, top_p=0.01, seed=1),
    ):
        assert draw(params, 500) == Counter({0: 500})


def test_a_batch_samples_each_row_by_its_own_settings():
    greedy = Sequence([0], SamplingParams(temperature=0))
    top2 = Sequence([0], SamplingParams(temperature=1.0, top_k=2, seed=3))
    flipped = torch.stack([LOGITS, LOGITS.flip(0)])
    rows = [sample(flipped, [greedy, top2]) for _ in range(200)]
    assert {r[0] for r in rows} == {0}
    assert {r[1] for r in rows} == {len(LOGITS) - 1, len(LOGITS) - 2}


def test_settings_at_the_edges_of_their_ranges_sample_without_failing_the_batch():
    """Values the checks accept, however extreme, give tokens: float32 must not overflow into
    a NaN distribution, which would fail the whole batch's step, other requests' rows too."""
    seen = [0, 1]  # the context: the two likeliest tokens (the prompt, 9, has a negative logit)
    rows = {
        "greedy": (SamplingParams(temperature=0), {0}),
        "tiny temperature": (SamplingParams(temperature=1e-38, seed=1), {0}),
        "tiny top_p": (SamplingParams(temperature=1.0, top_p=1e-46, seed=1), {0}),
        # Both seen tokens' logits overflow: they share the mass.
        "tiny repetition_penalty": (SamplingParams(repetition_penalty=1e-39, seed=1), {0, 1}),
        "huge repetition_penalty": (SamplingParams(repetition_penalty=1e38, seed=1), None),
    }
    seqs = [Sequence([9], params, context_token_ids=tuple(seen)) for params, _ in rows.values()]
    logits = LOGITS.expand(len(seqs), -1)
    draws = [sample(logits, seqs) for _ in range(50)]
    for i, (name, (_, allowed)) in enumerate(rows.items()):
        tokens = {d[i] for d in draws}
        assert tokens <= (allowed or set(range(len(LOGITS)))), name
    assert {d[3] for d in draws} == {0, 1}
