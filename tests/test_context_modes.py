"""The three composition modes against Hugging Face references."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from reference import (
    hf_greedy,
    hf_kv,
    hf_logits,
    hf_logits_over_kv,
    hf_realigned_kv,
    hf_rerotated,
)

from kvchunks.common import ChunkNotFound, InvalidInput
from kvchunks.engine import SamplingParams
from kvchunks.engine.chat import ChatFormat
from kvchunks.service.compose import leading_tokens
from kvchunks.vocabulary import DEFAULT_RECOMPUTE

GREEDY = SamplingParams(temperature=0, max_tokens=24)
DOC_A = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."
DOC_B = "Marie's favourite colour is teal, and she keeps three cats named Io, Europa and Callisto."


def prompt_logits(cm, question: str, mode: str, recompute=None) -> tuple[list[int], torch.Tensor]:
    """Logits of the question's tokens attending to cm's active chunks in `mode`."""
    store = cm.store
    active = store.registry.get_many(store.registry.active(cm.context_name))
    tokens = store.model.chat.prompt(question)
    ctx = store.composer.context_of(active, mode, recompute)
    result = store.model.llm.prefill(tokens, ctx.segments, ctx.position, all_logits=True)
    store.tiers.free([result.segment])
    store.composer.release(ctx)
    return tokens, result.logits


def tokens_of(cm, chunks) -> list[int]:
    """What the model reads over `chunks` in `exact`: the model's opening, then their tokens."""
    return cm.store.model.chat.opening + [t for c in chunks for t in c.token_ids]


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


def test_every_context_starts_with_the_models_opening(make_cm, llm):
    """The opening is an empty system turn as the chat template renders it; a chunk loaded
    alone is computed right after it."""
    cm = make_cm()
    chat = cm.store.model.chat
    assert llm.tokenizer.decode(chat.opening) == "<|im_start|>system\n<|im_end|>\n"
    rendered = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert chat.opening + chat.prompt("Hi") == list(llm.encode(rendered))
    doc = cm.add_chunk(DOC_A)
    assert doc.position == len(chat.opening) and doc.parent_chunks == []
    # Without a template, the opening is the special tokens the tokenizer puts first.
    plain = copy.deepcopy(llm.tokenizer)
    plain.chat_template = None
    assert ChatFormat(plain).opening == []
    plain.add_bos_token = True
    assert ChatFormat(plain).opening == [plain.bos_token_id]


def test_a_chunk_computed_without_the_opening_is_not_rebuilt_out_of_place(make_cm):
    """A chunk stored before every context started with the opening sits at position 0:
    once its KV is lost it is refused in one line, not computed again where it overlaps."""
    cm = make_cm()
    store = cm.store
    tokens = store.model.chat.frame("system", DOC_A)
    old = store.maker.new_record(tokens, [], 0, "", "reuse", role="system", kind="input")
    with store.lock:
        store.maker.register(old, [store.model.llm.prefill(tokens, [], 0).segment])
        store.tiers.evict(old.hash)
    store.files.remove(old.hash)  # no copy left anywhere: only a rebuild could bring it back
    cm.activate_chunk(old.hash)
    with pytest.raises(ChunkNotFound, match="without the model's opening"):
        cm.generate("Where is the vault?", GREEDY)
    assert not store.registry.missing([old.hash])  # refused, not deleted


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
    assert history + q == cm.store.model.chat.opening + list(rendered)
    _, exact = prompt_logits(cm, "And its code?", "exact")
    ref = hf_logits(hf_model, history + q)[-len(q) :]
    assert (reuse - ref).abs().max().item() <= 1e-4
    assert (exact - ref).abs().max().item() <= 1e-4
    expected = hf_greedy_text(hf_model, llm, history + q, 24)
    cm.configure(auto_activate=False)  # each generation below sees the same three chunks
    assert cm.generate("And its code?", GREEDY, mode="reuse").text == expected
    assert cm.generate("And its code?", GREEDY, mode="exact").text == expected
    assert [c.hash for c in cm.context().chunks] == [c.hash for c in active]


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
    hidden_from = len(cm.store.model.chat.opening) + doc.token_count
    hidden_to = hidden_from + first.prompt_chunk.token_count + first.output_chunk.token_count
    mask[len(history) :, hidden_from:hidden_to] = False
    ref = hf_logits(hf_model, history + q, mask=mask)[-len(q) :]
    assert (logits - ref).abs().max().item() <= 1e-4
    unmasked = hf_logits(hf_model, history + q)[-len(q) :]
    assert (logits - unmasked).abs().max().item() > 1e-3  # hiding really changed something


def test_realign_equals_hfs_own_kv_of_each_chunk_moved_into_place(make_cm, hf_model):
    cm = make_cm()
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    cm.activate_chunk(a.hash)
    cm.activate_chunk(b.hash)
    q, logits = prompt_logits(cm, "What colour does Marie like?", "realign", recompute=0)
    opening = cm.store.model.chat.opening
    kv = hf_realigned_kv(hf_model, opening, [a.token_ids, b.token_ids])
    ref = hf_logits_over_kv(hf_model, kv, q, len(tokens_of(cm, [a, b])))
    assert (logits - ref).abs().max().item() <= 1e-4
    _, reuse = prompt_logits(cm, "What colour does Marie like?", "reuse")
    assert (reuse - ref).abs().max().item() > 1e-3  # reuse leaves b at overlapping positions


def test_realign_moves_a_view_that_starts_inside_its_chunk_from_where_it_was(make_cm, hf_model):
    """The tail of a split sat at the chunk's position plus the split point: re-placed after
    another chunk, its keys turn by the distance from there, as HF's own cache of the whole
    chunk, cut and moved, does."""
    cm = make_cm()
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    at = 7
    _, tail = cm.split_chunk(b.hash, at)
    cm.activate_chunk(a.hash)
    cm.activate_chunk(tail.hash)
    q, logits = prompt_logits(cm, "Who has cats?", "realign", recompute=0)
    opening = cm.store.model.chat.opening
    o = len(opening)
    kv = hf_realigned_kv(hf_model, opening, [a.token_ids])
    cut = [
        (k[:, :, o + at :], v[:, :, o + at :]) for k, v in hf_kv(hf_model, opening + b.token_ids)
    ]
    kv = [
        (
            torch.cat([k, hf_rerotated(hf_model, tk, len(a.token_ids) - at)], 2),
            torch.cat([v, tv], 2),
        )
        for (k, v), (tk, tv) in zip(kv, cut, strict=True)
    ]
    ref = hf_logits_over_kv(hf_model, kv, q, o + a.token_count + tail.token_count)
    assert (logits - ref).abs().max().item() <= 1e-4


def test_turns_computed_in_another_mode_are_composed_again_not_continued(make_cm):
    """A question and answer computed over two documents in `exact` continue exact's
    composition only: in `realign` their KV read other KV than realign's, so they are part of
    the composition (placed and recomputed with the documents), not appended as stored."""
    cm = make_cm(auto_activate=True)
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    cm.activate_chunk(a.hash)
    cm.activate_chunk(b.hash)
    cm.generate("Who has cats?", SamplingParams(temperature=0, max_tokens=8), mode="exact")
    store = cm.store
    active = store.registry.get_many(store.registry.active(cm.context_name))
    assert len(active) == 4  # the documents, the question and the answer
    for mode, recompute, recomputed in (
        ("exact", None, 0),  # the documents' composition is kept; the turn continues it
        # The first document sits where it was computed: composed are the rest, turn too.
        ("realign", 0.5, round(0.5 * sum(c.token_count for c in active[1:]))),
    ):
        ctx = store.composer.context_of(active, mode, recompute)
        store.composer.release(ctx)
        assert ctx.recomputed == recomputed, mode


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


def two_documents(make_cm, **settings):
    cm = make_cm(**settings)
    a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
    cm.activate_chunk(a.hash)
    cm.activate_chunk(b.hash)
    return cm, a, b


def test_realign_generation_decodes_like_hf_over_the_moved_kv(make_cm, hf_model):
    cm, a, b = two_documents(make_cm)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    g = cm.generate("What colour does Marie like?", params, mode="realign", recompute=0)
    kv = hf_realigned_kv(hf_model, cm.store.model.chat.opening, [a.token_ids, b.token_ids])
    ids, start = list(g.prompt_chunk.token_ids), len(tokens_of(cm, [a, b]))
    for _ in range(12):  # HF's greedy loop, one full forward over the cache per step
        ids.append(int(hf_logits_over_kv(hf_model, kv, ids, start)[-1].argmax()))
    assert g.token_ids == ids[g.prompt_chunk.token_count :]


def test_hidden_turn_generation_decodes_like_masked_reference(make_cm, hf_model):
    cm, doc, first = conversation(make_cm)
    second = cm.generate("What is its code?", GREEDY)
    cm.configure(auto_activate=False)
    cm.deactivate_chunk(first.prompt_chunk.hash)
    cm.deactivate_chunk(first.output_chunk.hash)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    g = cm.generate("Say it again.", params, mode="reuse")
    timeline = [doc, first.prompt_chunk, first.output_chunk, second.prompt_chunk]
    history = tokens_of(cm, [*timeline, second.output_chunk])
    gap = range(doc.position + doc.token_count, timeline[-1].position)
    assert g.prompt_chunk.position == len(history)  # positions as in the full timeline
    ids = history + g.prompt_chunk.token_ids
    assert g.token_ids == hf_greedy(hf_model, ids, 12, hidden=gap, hidden_from=len(history))


def test_reuse_of_separate_chunks_equals_overlapping_positions_reference(make_cm, hf_model):
    """Separately loaded chunks in `reuse` keep the positions they were computed at (all
    right after the opening) and see nothing of each other; the question starts after the
    longest."""
    cm, a, b = two_documents(make_cm)
    q, logits = prompt_logits(cm, "What is the code of the vault?", "reuse")
    ids = tokens_of(cm, [a, b]) + q
    o = len(cm.store.model.chat.opening)
    end = o + max(a.token_count, b.token_count)
    positions = [*range(o + a.token_count), *range(o, o + b.token_count)]
    positions += range(end, end + len(q))
    n = len(ids)
    mask = torch.ones(n, n).tril().bool()
    mask[o + a.token_count : o + a.token_count + b.token_count, o : o + a.token_count] = False
    ref = hf_logits(hf_model, ids, mask=mask, position_ids=positions)[-len(q) :]
    assert (logits - ref).abs().max().item() <= 1e-4


def test_realign_recomputing_everything_equals_exact_and_reference(make_cm, hf_model):
    cm, a, b = two_documents(make_cm)
    q, full = prompt_logits(cm, "What is the code of the vault?", "realign", recompute=1.0)
    _, exact = prompt_logits(cm, "What is the code of the vault?", "exact")
    ref = hf_logits(hf_model, tokens_of(cm, [a, b]) + q)[-len(q) :]
    assert (full - ref).abs().max().item() <= 1e-4
    assert (full - exact).abs().max().item() <= 1e-4


def test_realign_without_recompute_is_plain_replacement_bitwise(make_cm, llm):
    cm, a, b = two_documents(make_cm)
    q, logits = prompt_logits(cm, "What is the code of the vault?", "realign", recompute=0)
    sa, sb = cm.store.composer.segments(a), cm.store.composer.segments(b)
    opening = cm.store.tiers.opening_kv()
    shifted = [*opening, *sa, *(dataclasses.replace(s, shift=a.token_count) for s in sb)]
    end = b.position + a.token_count + b.token_count
    plain = llm.prefill(q, shifted, end, all_logits=True)
    llm.release(plain.segment)
    assert torch.equal(logits, plain.logits)
    _, partial = prompt_logits(cm, "What is the code of the vault?", "realign", recompute=0.15)
    assert (partial - logits).abs().max().item() > 1e-3  # recompute really changes the KV


def test_one_timeline_is_the_same_in_every_mode_and_setting(make_cm):
    cm, doc, first = conversation(make_cm)
    settings = [("reuse", None), ("exact", None), ("realign", 0.0), ("realign", 0.15)]
    settings.append(("realign", 1.0))
    results = [prompt_logits(cm, "And its code?", m, r)[1] for m, r in settings]
    assert all(torch.equal(r, results[0]) for r in results[1:])
    active_tokens = cm.context().token_count
    g = cm.generate("And its code?", GREEDY, mode="realign", recompute=0.3)
    assert g.tokens_recomputed == 0 and g.tokens_reused == active_tokens


def test_second_question_over_a_composition_recomputes_nothing(make_cm, tmp_path):
    cm, a, b = two_documents(make_cm)
    first = cm.generate("Who has three cats?", GREEDY)
    assert first.mode == "realign" and first.tokens_recomputed > 0
    assert first.recompute == DEFAULT_RECOMPUTE  # the fraction used, not the None asked for
    assert first.tokens_reused + first.tokens_recomputed == a.token_count + b.token_count
    second = cm.generate("What is the code of the vault?", GREEDY)
    assert second.tokens_recomputed == 0
    assert second.tokens_reused == a.token_count + b.token_count
    # The same question over a composition made just now (another store) answers the same.
    fresh, fa, fb = two_documents(make_cm, at=tmp_path / "fresh")
    assert (fa.hash, fb.hash) == (a.hash, b.hash)
    again = fresh.generate("What is the code of the vault?", GREEDY)
    assert again.tokens_recomputed == first.tokens_recomputed
    assert again.token_ids == second.token_ids
    assert again.output_chunk.hash == second.output_chunk.hash
    assert cm.generate("Who has three cats?", GREEDY, mode="reuse").recompute is None


def test_a_conversation_over_a_composition_continues_without_recompute(make_cm):
    cm, a, b = two_documents(make_cm, auto_activate=True)
    first = cm.generate("Who has three cats?", GREEDY)
    assert len(cm.context().chunks) == 4
    second = cm.generate("And what are their names?", GREEDY)
    assert second.tokens_recomputed == 0  # the first answer continues the composition
    assert second.prompt_chunk.parent_chunks == [a.hash, b.hash, *_turn(first)]


def _turn(g) -> list[str]:
    return [g.prompt_chunk.hash, g.output_chunk.hash]


def test_derived_kv_goes_with_its_sources_and_under_pressure(make_cm):
    cm, a, b = two_documents(make_cm)
    store = cm.store
    cm.generate("Who has three cats?", GREEDY)
    assert len(store.tiers.compositions) == 1
    assert [c.hash for c in cm.list_chunks()].count(a.hash) == 1
    assert len(cm.list_chunks()) == 4  # two documents, a prompt and an answer: nothing derived
    cm.deactivate_chunk(b.hash)
    with store.lock:  # pressure: room for the whole pool but the active document
        held = len(store.tiers.opening_kv()[0].blocks)  # the opening's KV stays
        store.tiers.make_room(store.model.llm.block_manager.num_blocks - held - 1)
    assert not store.tiers.compositions and store.stats["compositions_dropped"] == 1
    cm.activate_chunk(b.hash)
    again = cm.generate("Who has three cats?", GREEDY)
    assert again.tokens_recomputed > 0 and len(store.tiers.compositions) == 1  # made again
    cm.delete_chunk(b.hash)
    assert not store.tiers.compositions


def test_bad_recompute_settings_are_refused_and_change_nothing(make_cm):
    cm, a, b = two_documents(make_cm)
    before = (cm.settings, [c.hash for c in cm.list_chunks()])
    refusals = [
        lambda: cm.generate("Hi", GREEDY, mode="exact", recompute=0.2),
        lambda: cm.generate("Hi", GREEDY, mode="reuse", recompute=0.0),
        lambda: cm.generate("Hi", GREEDY, mode="realign", recompute=1.5),
        lambda: cm.generate("Hi", GREEDY, recompute=-0.1),
        lambda: cm.generate("Hi", GREEDY, recompute="half"),
        lambda: cm.configure(recompute=2),
        lambda: cm.configure(mode="exact", recompute=0.5),
    ]
    for refuse in refusals:
        with pytest.raises(InvalidInput, match="recompute"):
            refuse()
    assert (cm.settings, [c.hash for c in cm.list_chunks()]) == before
    assert not cm.store.tiers.compositions
    cm.configure(recompute=0.3)
    cm.configure(mode="exact")  # a new mode without a fraction clears it
    assert cm.settings["recompute"] is None


def test_realign_recomputes_each_chunks_leading_tokens_evenly():
    assert leading_tokens([10, 3, 10], 9) == [0, 1, 2, 10, 11, 12, 13, 14, 15]
    assert leading_tokens([10, 3, 10], 12) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 16]
    assert leading_tokens([4, 4], 100) == list(range(8))
    assert leading_tokens([4, 4], 0) == []
