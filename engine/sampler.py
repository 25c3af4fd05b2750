"""Next-token selection: greedy, temperature, top-k, top-p, with optional per-request seeds."""

from __future__ import annotations

import torch

from kvchunks.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token id per row of logits [B, vocab]."""
    if all(s.params.greedy for s in seqs):
        return logits.argmax(dim=-1).tolist()
    return [_sample_one(row, s) for row, s in zip(logits, seqs, strict=True)]


def _sample_one(logits: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    if p.greedy:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the first always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
