"""Next-token selection: penalties, then greedy, temperature, top-k, top-p, with optional
per-request seeds."""

from __future__ import annotations

import torch

from kvchunks.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token id per row of logits [B, vocab]."""
    if any(s.params.penalized for s in seqs):  # default decoding skips this altogether
        logits = penalize(logits, seqs)
    if all(s.params.greedy for s in seqs):
        return logits.argmax(dim=-1).tolist()
    return [_sample_one(row, s) for row, s in zip(logits, seqs, strict=True)]


def _sample_one(logits: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    if p.greedy:
        return int(logits.argmax())
    # Penalties far from 1 can push logits to infinity, which softmax turns into NaN: the
    # largest finite float stands in for it (those tokens share the mass, as in the limit).
    biggest = torch.finfo(torch.float32).max
    logits = (logits.float() / p.temperature).clamp(-biggest, biggest)
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the first always stays
        # (a top_p below float32's smallest number compares as 0, which would drop it too).
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
        drop[0] = False
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    if seq.generator is not None:  # a seed's generator is a CPU one: the same draws anywhere
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The batch's logits with each sequence's penalties applied (float32; rows without
    penalties come out unchanged): repetition_penalty over every token the sequence has seen,
    then presence and frequency penalties over its answer's tokens."""
    logits = logits.float()
    column = {"device": logits.device, "dtype": logits.dtype}
    repetition = torch.tensor([s.params.repetition_penalty for s in seqs], **column)[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in seqs], **column)[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs], **column)[:, None]
    seen = _counts(logits, [[*s.context_token_ids, *s.token_ids] for s in seqs]) > 0
    scaled = torch.where(logits < 0, logits * repetition, logits / repetition)
    logits = torch.where(seen, scaled, logits)
    answered = _counts(logits, [s.completion_token_ids for s in seqs])
    return logits - frequency * answered - presence * (answered > 0).to(logits.dtype)


def _counts(logits: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """[B, vocab]: how often each token id occurs in each row (one scatter for the batch)."""
    width = max(1, max(map(len, rows)))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    ones = torch.zeros(len(rows), width, dtype=logits.dtype)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        ones[i, : len(row)] = 1
    counts = torch.zeros_like(logits)
    return counts.scatter_add_(1, ids.to(logits.device), ones.to(logits.device))
