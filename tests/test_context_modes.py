"""The three composition modes against Hugging Face references (DESIGN.md section 4)."""

from __future__ import annotations

import torch
from reference import hf_logits

from kvchunks.engine import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)
DOC_A = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."
DOC_B = "Marie's favourite colour is teal, and she keeps three cats named Io, Europa and Callisto."


def prompt_logits(cm, question: str, mode: str) -> tuple[list[int], torch.Tensor]:
    """Logits of the question's tokens attending to cm's active chunks in `mode`."""
    store = cm.store
    active = store.registry.get_many(store.registry.active(cm.context_name))
    tokens = store.chat.prompt(question)
    ctx = store.context_of(active, mode)
    result = store.llm.prefill(tokens, ctx.segments, ctx.position, all_logits=True)
    store.free([*ctx.scratch, result.segment])
    return tokens, result.logits


def tokens_of(cm, chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def hf_greedy_text(hf_model, llm, ids: list[int], n: int) -> str:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2
        )[0, len(ids) :].tolist()
    if 2 in out:
        out = out[: out.index(2) + 1]
    return llm.decode(out)


def test_exact_equals_reference_on_concatenated_tokens(make_cm, hf_model, llm):
    cm = make_cm(mode="exact")
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    cm.activate_chunk(a.hash)
    cm.activate_chunk(b.hash)
    q, logits = prompt_logits(cm, "What is the code of the vault?", "exact")
    ids = tokens_of(cm, [a, b]) + q
    assert (logits - hf_logits(hf_model, ids)[-len(q) :]).abs().max().item() <= 1e-4
    g = cm.generate("What is the code of the vault?", GREEDY)
    assert g.text == hf_greedy_text(hf_model, llm, ids, 24)


def conversation(make_cm, context="chat"):
    cm = make_cm(context, auto_activate=True)
    doc = cm.add_chunk(DOC_A)
    cm.activate_chunk(doc.hash)
    first = cm.generate("Where is the vault?", GREEDY)
    return cm, doc, first


def test_conversation_in_reuse_equals_exact_and_reference(make_cm, hf_model, llm):
    cm, doc, first = conversation(make_cm)
    active = cm.context().chunks
    assert [c.hash for c in active] == [doc.hash, first.prompt_chunk.hash, first.output_chunk.hash]
    history = tokens_of(cm, active)
    # The chunks are exactly the chat template's rendering of the conversation.
    rendered = llm.encode(
        [
            {"role": "system", "content": DOC_A},
            {"role": "user", "content": "Where is the vault?"},
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "And its code?"},
        ]
    )
    q, reuse = prompt_logits(cm, "And its code?", "reuse")
    assert history + q == list(rendered)
    _, exact = prompt_logits(cm, "And its code?", "exact")
    ref = hf_logits(hf_model, history + q)[-len(q) :]
    assert (reuse - ref).abs().max().item() <= 1e-4
    assert (exact - ref).abs().max().item() <= 1e-4
    expected = hf_greedy_text(hf_model, llm, history + q, 24)
    assert cm.generate("And its code?", GREEDY, mode="reuse").text == expected
    assert cm.with_context("chat").generate("And its code?", GREEDY, mode="exact").text == expected


def test_reuse_with_a_turn_deactivated_equals_masked_reference(make_cm, hf_model):
    cm, doc, first = conversation(make_cm)
    second = cm.generate("What is its code?", GREEDY)
    cm.deactivate_chunk(first.prompt_chunk.hash)
    cm.deactivate_chunk(first.output_chunk.hash)
    timeline = [doc, first.prompt_chunk, first.output_chunk, second.prompt_chunk]
    timeline.append(second.output_chunk)
    history = tokens_of(cm, timeline)
    q, logits = prompt_logits(cm, "Say it again.", "reuse")
    n = len(history) + len(q)
    mask = torch.ones(n, n).tril().bool()
    hidden_from = doc.token_count
    hidden_to = hidden_from + first.prompt_chunk.token_count + first.output_chunk.token_count
    mask[len(history) :, hidden_from:hidden_to] = False
    ref = hf_logits(hf_model, history + q, mask=mask)[-len(q) :]
    assert (logits - ref).abs().max().item() <= 1e-4
    unmasked = hf_logits(hf_model, history + q)[-len(q) :]
    assert (logits - unmasked).abs().max().item() > 1e-3  # hiding really changed something


def test_realign_equals_block_diagonal_reference(make_cm, hf_model):
    cm = make_cm()
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    cm.activate_chunk(a.hash)
    cm.activate_chunk(b.hash)
    q, logits = prompt_logits(cm, "What colour does Marie like?", "realign")
    ids = tokens_of(cm, [a, b]) + q
    n = len(ids)
    mask = torch.ones(n, n).tril().bool()
    mask[a.token_count : a.token_count + b.token_count, : a.token_count] = False
    ref = hf_logits(hf_model, ids, mask=mask)[-len(q) :]
    assert (logits - ref).abs().max().item() <= 1e-4
    _, reuse = prompt_logits(cm, "What colour does Marie like?", "reuse")
    assert (reuse - ref).abs().max().item() > 1e-3  # reuse leaves b at overlapping positions


def test_views_attend_exactly_like_their_sources(make_cm):
    cm = make_cm()
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    for mode in ("reuse", "realign", "exact"):
        cm.clear()
        cm.activate_chunk(a.hash)
        cm.activate_chunk(b.hash)
        _, sources = prompt_logits(cm, "Who has cats?", mode)
        composed = cm.compose_chunks([a.hash, b.hash])
        cm.clear()
        cm.activate_chunk(composed.hash)
        _, view = prompt_logits(cm, "Who has cats?", mode)
        assert torch.equal(view, sources), mode
        head, tail = cm.split_chunk(a.hash, at=10)
        cm.clear()
        for c in (head, tail, b):
            cm.activate_chunk(c.hash)
        _, halves = prompt_logits(cm, "Who has cats?", mode)
        assert torch.equal(halves, sources), mode
    assert composed.kind == "composed" and composed.token_count == a.token_count + b.token_count
    assert head.token_ids + tail.token_ids == a.token_ids
    assert composed.segments and {s.blocks[0] for s in composed.segments} <= {
        s.blocks[0] for s in a.segments + b.segments
    }
