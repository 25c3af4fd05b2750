"""Each half-precision dtype end to end, against HF `transformers` on the same checkpoint:
two stored documents, a question over them in each composition mode, and the chunks the
answer leaves.

Tolerances: the engine's logits are compared with HF's in float32 and may be off by at most
twice as much as HF's own in the same dtype (rounding differs with the order of the sums,
and the engine computes each chunk's KV in a pass of its own). A greedy answer is checked
token by token against HF's logits in the same dtype for the same prefix, in one
teacher-forced forward pass: each token the engine picks must be HF's best or within 0.25
of it, two steps of bfloat16 at the size of these logits. Whole greedy answers are not
compared: they part at the first near tie, where HF's own cached decoding and its full
forward pass can disagree too."""

from __future__ import annotations

import pytest
import torch
from reference import hf_logits, hf_logits_over_kv, hf_realigned_kv

from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.kv_file import kv_path, read_kv_header

DOC_A = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."
DOC_B = "Marie's favourite colour is teal, and she keeps three cats named Io, Europa and Callisto."
QUESTION = "What is the code of the vault?"
GREEDY = SamplingParams(temperature=0, max_tokens=24)
NEAR_TIE = 0.25


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def engines(request, model_path):
    """The dtype, and the engine and HF's model in it."""
    from transformers import AutoModelForCausalLM

    dtype = request.param
    llm = LLM(model_path, EngineConfig(kv_cache_bytes=64 << 20, dtype=dtype))
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    return dtype, llm, hf


@pytest.fixture
def two_documents(engines, home):
    """A manager whose two stored documents are active."""
    _, llm, _ = engines
    store = ChunkStore(home=home, llm=llm)
    cm = ContextManager(store=store)
    for text in (DOC_A, DOC_B):
        cm.activate_chunk(cm.add_chunk(text).hash)
    yield cm
    store.close()
    assert llm.block_manager.num_free == llm.block_manager.num_blocks, "pool blocks leaked"


def documents(cm: ContextManager) -> list[ChunkInfo]:
    return cm.registry.get_many(cm.registry.active(cm.context_name))


def tokens_of(cm: ContextManager, chunks: list[ChunkInfo]) -> list[int]:
    """What the model reads over `chunks` in `exact`: the model's opening, then their tokens."""
    return cm.store.model.chat.opening + [t for c in chunks for t in c.token_ids]


def assert_near_greedy(logits: torch.Tensor, answer: list[int]) -> None:
    """Each answer token is HF's best, or within NEAR_TIE of it, given what precedes it
    (`logits`: HF's, one row per answer token)."""
    chosen = logits.gather(1, torch.tensor(answer)[:, None])[:, 0]
    assert (logits.max(1).values - chosen).max().item() <= NEAR_TIE


def test_exact_answers_as_hf_does_over_the_tokens_in_order(engines, two_documents, home):
    dtype, llm, hf = engines
    cm = two_documents
    assert llm.runner.kv_cache.dtype == getattr(torch, dtype)
    result = cm.generate(QUESTION, GREEDY, mode="exact")
    assert len(result.token_ids) > 4
    context = tokens_of(cm, documents(cm)) + result.prompt_chunk.token_ids
    logits = hf_logits(hf, context + result.token_ids)[len(context) - 1 : -1]
    assert_near_greedy(logits, result.token_ids)
    for chunk in (result.prompt_chunk, result.output_chunk):
        assert chunk.metadata["dtype"] == dtype
        assert read_kv_header(kv_path(home, chunk.hash)).dtype == dtype


def test_realign_answers_as_hf_does_with_each_document_apart(engines, two_documents):
    """realign without recompute: the documents placed one after the other, each computed
    after the opening alone; the question and the answer see both."""
    _, _, hf = engines
    cm = two_documents
    a, b = documents(cm)
    result = cm.generate(QUESTION, GREEDY, mode="realign", recompute=0)
    kv = hf_realigned_kv(hf, cm.store.model.chat.opening, [a.token_ids, b.token_ids])
    asked = result.prompt_chunk.token_ids
    logits = hf_logits_over_kv(hf, kv, asked + result.token_ids, len(tokens_of(cm, [a, b])))
    assert_near_greedy(logits[len(asked) - 1 : -1].float(), result.token_ids)


@pytest.mark.parametrize("mode", ["exact", "reuse"])
def test_question_logits_are_as_close_to_float32_as_hfs_own(engines, two_documents, hf_model, mode):
    """The question's logits over the documents, against HF's in float32: the engine's error
    is at most twice HF's own in the same dtype, at its largest and on average. In exact the
    documents are one timeline; in reuse each one's KV is as computed alone after the
    opening, and the question starts after the longer one."""
    _, _, hf = engines
    store = two_documents.store
    a, b = documents(two_documents)
    prompt = store.model.chat.prompt(QUESTION)
    ctx = store.composer.context_of([a, b], mode, None)
    result = store.model.llm.prefill(prompt, ctx.segments, ctx.position, all_logits=True)
    store.tiers.free([result.segment])
    store.composer.release(ctx)
    ids = tokens_of(two_documents, [a, b]) + prompt
    mask = torch.ones(len(ids), len(ids)).tril().bool()
    positions = None
    if mode == "reuse":
        o = len(store.model.chat.opening)
        mask[o + a.token_count : o + a.token_count + b.token_count, o : o + a.token_count] = False
        end = o + max(a.token_count, b.token_count)
        positions = [*range(o + a.token_count), *range(o, o + b.token_count)]
        positions += range(end, end + len(prompt))
    truth, same_dtype = (
        hf_logits(model, ids, mask=mask, position_ids=positions)[-len(prompt) :]
        for model in (hf_model, hf)
    )
    ours, theirs = (result.logits.float() - truth).abs(), (same_dtype - truth).abs()
    assert ours.max() <= 2 * theirs.max() and ours.mean() <= 2 * theirs.mean()
