"""Independent oracles: Hugging Face transformers on the same checkpoint, in float32, and the
bytes of tensors for bitwise comparisons."""

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
