"""Independent oracles: Hugging Face transformers on the same checkpoint (in float32 unless a
test loads it in another dtype), and the bytes of tensors for bitwise comparisons."""

from __future__ import annotations

import torch


def hf_logits(hf_model, token_ids: list[int], mask=None, position_ids=None) -> torch.Tensor:
    """Reference logits [n, vocab]; mask [n, n] bool (True = may attend) with positions."""
    ids = torch.tensor([token_ids])
    kwargs = {}
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=torch.float32)
        additive.masked_fill_(~mask, torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = additive[None, None]
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor([position_ids])
    with torch.no_grad():
        return hf_model(ids, **kwargs).logits[0].float()


def bits(t: torch.Tensor) -> bytes:
    """A tensor's bytes: equal only if every element is bitwise equal (-0.0 is not 0.0)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def hf_greedy(
    hf_model,
    token_ids: list[int],
    steps: int,
    blocks: tuple[tuple[int, int], ...] = (),
    hidden: range = range(0),
    hidden_from: int = 0,
) -> list[int]:
    """Greedy tokens of an HF step-by-step loop (one full forward per step) at positions
    0..n-1 under a mask: the tokens of each (start, end) in `blocks` see only their own
    range (chunks computed standalone), and tokens from index `hidden_from` on, generated
    ones included, do not see the `hidden` tokens."""
    ids, out = list(token_ids), []
    for _ in range(steps):
        n = len(ids)
        mask = torch.ones(n, n).tril().bool()
        for start, end in blocks:
            mask[start:end, :start] = False
        mask[hidden_from:, hidden.start : hidden.stop] = False
        token = int(hf_logits(hf_model, ids, mask=mask)[-1].argmax())
        out.append(token)
        ids.append(token)
    return out


def hf_generate(hf_model, token_ids: list[int], max_new_tokens: int, **options) -> list[int]:
    """The new tokens of HF's `generate` (greedy unless `options` say otherwise; they are
    passed on, e.g. repetition_penalty)."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([token_ids]),
            attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=2,
            **options,
        )
    return out[0, len(token_ids) :].tolist()
