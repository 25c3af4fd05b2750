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


def hf_kv(hf_model, token_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """HF's own cache of `token_ids` at positions 0..n-1: per layer (K, V), each
    [1, kv_heads, n, head_dim], keys rotated as HF caches them."""
    with torch.no_grad():
        out = hf_model(torch.tensor([token_ids]), use_cache=True)
    cache = out.cache
    return [(layer.keys, layer.values) for layer in cache.layers]


def hf_rerotated(hf_model, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Cached keys moved `delta` positions on, with HF's own rotary embedding (a rotation by
    p then by delta is the rotation by p + delta)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = hf_model.model.rotary_emb(keys, torch.full((1, keys.shape[2]), delta))
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]


def hf_logits_over_kv(
    hf_model, kv: list[tuple[torch.Tensor, torch.Tensor]], token_ids: list[int], position: int
) -> torch.Tensor:
    """Logits [n, vocab] of `token_ids` at positions from `position` on, attending to the
    given per-layer cache (all of it) and causally to each other."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), layer)
    positions = torch.arange(position, position + len(token_ids))[None]
    with torch.no_grad():
        out = hf_model(torch.tensor([token_ids]), cache=cache, position_ids=positions)
    return out.logits[0].float()


def hf_realigned_kv(hf_model, opening: list[int], chunks: list[list[int]]):
    """The cache `realign` without recompute attends to, made by HF: each chunk computed
    alone after the opening, its keys moved to sit right after the chunks before it."""
    o = len(opening)
    kv = [(k[:, :, :o], v[:, :, :o]) for k, v in hf_kv(hf_model, opening)]
    at = o
    for chunk in chunks:
        own = [(k[:, :, o:], v[:, :, o:]) for k, v in hf_kv(hf_model, opening + chunk)]
        kv = [
            (torch.cat([k, hf_rerotated(hf_model, ck, at - o)], 2), torch.cat([v, cv], 2))
            for (k, v), (ck, cv) in zip(kv, own, strict=True)
        ]
        at += len(chunk)
    return kv
