"""The catalog on its own: chunks and one context over a real embedded Redis, with no model
(a folder holding only config.json gives the context window) and no engine."""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path

import pytest

from kvchunks import Catalog, ContextManager, open_catalog
from kvchunks.common import (
    AmbiguousHash,
    ChunkNotFound,
    ConcurrentChange,
    ContextWindowExceeded,
    DtypeMismatch,
    InvalidInput,
)
from kvchunks.engine.checkpoint import context_window
from kvchunks.store.chunk import ChunkInfo, ChunkRecord, SourceSpan
from kvchunks.store.hashing import chunk_hash, content_hash, context_hash, model_fingerprint

FP = model_fingerprint("LlamaForCausalLM", "cd" * 32, "float32", 256, [])
WINDOW = 60  # tokens: the document and the question fit, adding the note would not


def record(tokens: list[int], *parents: ChunkRecord, **fields) -> ChunkRecord:
    """A chunk record computed after `parents` (standalone without)."""
    position = sum(p.token_count for p in parents)
    layout = "timeline" if parents else "standalone"
    return ChunkRecord(
        hash=chunk_hash(FP, context_hash([(p.hash, 0) for p in parents]), position, tokens),
        content_hash=content_hash(tokens),
        token_ids=tokens,
        parent_chunks=[p.hash for p in parents],
        position=position,
        layout=fields.pop("layout", layout),
        **fields,
    )


def model_folder(at: Path, window: int = WINDOW) -> Path:
    """What the catalog reads of a model: its config.json."""
    at.mkdir(parents=True, exist_ok=True)
    (at / "config.json").write_text(json.dumps({"max_position_embeddings": window}))
    return at


@pytest.fixture
def catalog(home, tmp_path):
    opened = open_catalog(model_folder(tmp_path / "model"), home=home)
    yield opened
    opened.close()


@pytest.fixture
def chunks(catalog) -> dict[str, ChunkRecord]:
    """A document, a question after it, an answer after both, and a note; the document's KV
    recorded in host memory, the others' on disk."""
    doc = record(list(range(1, 41)), text="the vault's code is 4817", tags=["facts"])
    question = record([7, 8, 9], doc, role="user", text="what is the code?")
    answer = record([10, 11], doc, question, role="assistant", kind="output", text="4817")
    note = record(list(range(50, 80)), text="tea at five")
    made = {"doc": doc, "question": question, "answer": answer, "note": note}
    for name, chunk in made.items():
        catalog.registry.put(chunk, tier="cpu" if name == "doc" else None)
    return made


def test_listing_lookup_and_provenance(catalog, chunks):
    doc, question, answer = chunks["doc"], chunks["question"], chunks["answer"]
    assert [c.hash for c in catalog.list_chunks()] == [c.hash for c in chunks.values()]
    assert [c.hash for c in catalog.list_chunks("vault")] == [doc.hash]
    assert [c.hash for c in catalog.list_chunks(tag="facts")] == [doc.hash]
    found = catalog.get_chunk(doc.hash[:8])
    assert found == ChunkInfo.view(doc, "cpu") and isinstance(found, ChunkInfo)
    assert catalog.get_chunk(question.hash).tier == "disk"  # no tier recorded: its file
    parents, children = catalog.provenance(question.hash[:6])
    assert [p.hash for p in parents] == [doc.hash]
    assert [c.hash for c in children] == [answer.hash]
    with pytest.raises(ChunkNotFound):
        catalog.get_chunk("ffff0000")
    twin = record([1, 2], text="twin")
    twin.hash = doc.hash[:4] + ("0" if doc.hash[4] != "0" else "1") * 60
    catalog.registry.put(twin)
    with pytest.raises(AmbiguousHash):
        catalog.get_chunk(doc.hash[:4])


def test_a_listing_pauses_the_garbage_collector_and_leaves_it_as_found(catalog, chunks):
    seen = []
    describe = catalog._describe
    catalog._describe = lambda found: seen.append(gc.isenabled()) or describe(found)
    assert len(catalog.list_chunks()) == len(chunks) and gc.isenabled()
    gc.disable()  # turned off by someone else: a listing does not turn it on
    try:
        catalog.list_chunks()
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert seen == [False, False]


def test_a_view_shows_its_furthest_source_tier(catalog, chunks):
    doc, note = chunks["doc"], chunks["note"]
    spans = [SourceSpan(doc.hash, 0, 40), SourceSpan(note.hash, 0, 30)]
    view = record(list(range(1, 41)) + list(range(50, 80)), kind="composed", layout="view")
    view.sources = spans
    catalog.registry.put(view)
    assert catalog.get_chunk(view.hash).tier == "disk"  # the note's file, not doc's memory
    catalog.registry.set_tiers({note.hash: "gpu"})
    assert catalog.get_chunk(view.hash).tier == "cpu"


def test_tags(catalog, chunks):
    note = chunks["note"]
    assert catalog.tag_chunk(note.hash[:8], "later").tags == ["later"]
    assert [c.hash for c in catalog.list_chunks(tag="later")] == [note.hash]
    assert catalog.untag_chunk(note.hash, "later").tags == []
    with pytest.raises(InvalidInput, match="invalid tag"):
        catalog.tag_chunk(note.hash, "two words")


def test_activation_keeps_order_and_the_window(catalog, chunks):
    doc, question, answer, note = chunks.values()
    assert catalog.activate_chunk(doc.hash[:8]).is_active
    catalog.activate_chunk(question.hash)
    catalog.activate_chunk(doc.hash)  # already active: nothing changes
    view = catalog.context()
    assert [c.hash for c in view.chunks] == [doc.hash, question.hash]
    assert (view.token_count, view.window) == (43, WINDOW)
    with pytest.raises(ContextWindowExceeded, match="would make 73 active tokens, over the"):
        catalog.activate_chunk(note.hash)
    assert [c.hash for c in catalog.context().chunks] == [doc.hash, question.hash]
    assert catalog.deactivate_chunk(question.hash[:8]).is_active is False
    catalog.activate_chunk(answer.hash)
    assert [c.hash for c in catalog.context().chunks] == [doc.hash, answer.hash]
    assert [c.is_active for c in catalog.list_chunks()] == [True, False, True, False]
    catalog.clear()
    assert catalog.context().chunks == []


def test_chunks_activated_or_deactivated_together_are_all_or_none(catalog, chunks):
    """In order, each once, after those already active, in one registry write; if one
    cannot be (not found, of another dtype, past the window with the others), none is, and
    the window's refusal names the request, not the chunk that would have overflowed."""
    doc, question, answer, note = chunks.values()
    catalog.activate_chunk(question.hash)
    views = catalog.activate_chunks([doc.hash[:8], question.hash, doc.hash])
    assert [(v.hash, v.is_active) for v in views] == [(doc.hash, True), (question.hash, True)]
    assert catalog.registry.active(catalog.context_name) == [question.hash, doc.hash]
    catalog.clear()
    half = record([1, 2, 3], text="computed in bfloat16", metadata={"dtype": "bfloat16"})
    catalog.registry.put(half)
    over = r"activating 3 chunks \(73 tokens\) would make 73 active tokens, over the context "
    for refs, refused, says in (
        ([doc.hash, "ffff0000"], ChunkNotFound, "ffff0000"),
        ([doc.hash, half.hash], DtypeMismatch, "bfloat16"),
        ([doc.hash, question.hash, note.hash], ContextWindowExceeded, over),
    ):
        with pytest.raises(refused, match=says):
            catalog.activate_chunks(refs)
        assert catalog.context().chunks == []
    assert catalog.activate_chunks([]) == []
    catalog.activate_chunks([doc.hash, question.hash])
    with pytest.raises(ChunkNotFound):
        catalog.deactivate_chunks([doc.hash, "ffff0000"])
    assert len(catalog.context().chunks) == 2
    hidden = catalog.deactivate_chunks([question.hash[:8], doc.hash, question.hash])
    assert [(c.hash, c.is_active) for c in hidden] == [(question.hash, False), (doc.hash, False)]
    assert catalog.context().chunks == [] and catalog.deactivate_chunks([]) == []


def test_activation_leaves_room_for_the_opening_its_models_engine_recorded(
    catalog, chunks, tmp_path
):
    """The model's opening precedes the active chunks: activation counts the length its
    engine recorded in the registry, as the generation's and composition's checks do."""
    doc, question = chunks["doc"], chunks["question"]
    catalog.activate_chunk(doc.hash)
    folder = str((tmp_path / "model").resolve())
    catalog.registry.record_opening(folder, WINDOW - 43)  # doc + question: 43 tokens
    catalog.activate_chunk(question.hash)  # exactly the room left
    catalog.deactivate_chunk(question.hash)
    catalog.registry.record_opening(folder, WINDOW - 42)
    refused = "over the context window of 60 after the model's 18-token opening"
    with pytest.raises(ContextWindowExceeded, match=refused):
        catalog.activate_chunk(question.hash)
    assert [c.hash for c in catalog.context().chunks] == [doc.hash]
    assert catalog.registry.opening("another model") == 0  # never ran: nothing counted


def test_reorder_lays_the_active_chunks_out_anew_in_one_step(catalog, chunks):
    doc, question, answer, note = chunks.values()
    for chunk in (doc, question, answer):
        catalog.activate_chunk(chunk.hash)
    view = catalog.reorder_chunks([answer.hash[:8], doc.hash, question.hash])
    order = [answer.hash, doc.hash, question.hash]
    assert [c.hash for c in view.chunks] == order
    assert catalog.registry.active(catalog.context_name) == order
    for wrong in (order[:2], [*order, doc.hash], [*order[:2], note.hash]):
        with pytest.raises(InvalidInput, match="every active chunk of the context once"):
            catalog.reorder_chunks(wrong)
    with pytest.raises(ChunkNotFound):
        catalog.reorder_chunks([*order[:2], "ffff0000"])
    with pytest.raises(ConcurrentChange):  # the list changed after it was read
        catalog.registry.reorder(catalog.context_name, order[::-1], expected=order[::-1])
    assert catalog.registry.active(catalog.context_name) == order


def test_sixteen_clients_activating_in_one_context_at_once_all_get_in(catalog):
    """Activation is optimistic: each round one client gets in, and the others try again
    after a random wait, often enough that sixteen at once all get in."""
    made = [record([100 + i, 200 + i]) for i in range(16)]
    for chunk in made:
        catalog.registry.put(chunk)
    together, refused = threading.Barrier(len(made)), []

    def activate(chunk: ChunkRecord) -> None:
        together.wait()
        try:
            catalog.activate_chunk(chunk.hash)
        except ConcurrentChange as e:
            refused.append(e)

    threads = [threading.Thread(target=activate, args=(chunk,)) for chunk in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == []
    assert sorted(catalog.registry.active(catalog.context_name)) == sorted(c.hash for c in made)


def test_chunks_of_another_dtype_are_not_activated(catalog, home, tmp_path):
    half = record([1, 2, 3], text="computed in bfloat16", metadata={"dtype": "bfloat16"})
    catalog.registry.put(half)
    with pytest.raises(DtypeMismatch, match="run with --dtype bfloat16"):
        catalog.activate_chunk(half.hash)
    assert catalog.context().chunks == []
    with open_catalog(model_folder(tmp_path / "model"), home=home, dtype="bfloat16") as other:
        assert other.activate_chunk(half.hash).is_active


def test_settings(catalog):
    assert catalog.settings["mode"] == "realign" and catalog.settings["auto_activate"] is False
    catalog.configure(mode="reuse", auto_activate=True)
    assert catalog.context().mode == "reuse" and catalog.context().auto_activate
    with pytest.raises(InvalidInput, match="recompute"):
        catalog.configure(recompute=0.5)  # realign only
    assert catalog.settings["recompute"] is None
    catalog.configure(output_tokens="manual")
    assert catalog.context().output_tokens == "manual"
    for wrong in (0, 2.5, "all"):
        with pytest.raises(InvalidInput, match="output_tokens must be a positive integer"):
            catalog.configure(output_tokens=wrong)
    assert catalog.context().to_json()["output_tokens"] == "manual"
    catalog.configure(mode=None, auto_activate=None)  # None: the default
    assert (catalog.settings["mode"], catalog.settings["auto_activate"]) == ("realign", False)


def test_contexts_are_independent(catalog, chunks, home, tmp_path):
    other = open_catalog(model_folder(tmp_path / "model"), context="other", home=home)
    try:
        catalog.activate_chunk(chunks["doc"].hash)
        assert other.context().chunks == []
        assert other.get_chunk(chunks["doc"].hash).is_active is False
    finally:
        other.close()


def test_the_model_is_looked_for_only_when_the_window_is_needed(home, tmp_path):
    missing = tmp_path / "no-model"
    with open_catalog(missing, home=home) as catalog:
        doc = record(list(range(1, 11)), text="doc")
        catalog.registry.put(doc)
        assert [c.hash for c in catalog.list_chunks()] == [doc.hash]
        with pytest.raises(InvalidInput, match="has no config.json"):
            catalog.activate_chunk(doc.hash)
        assert catalog.registry.active("default") == []


def test_what_a_manager_passes_in(catalog, chunks):
    """The parts a ContextManager hands over: its views of the pool, told of activations."""
    described, activated = [], []

    def describe(chunks: list[ChunkInfo]) -> list[ChunkInfo]:
        described.append(len(chunks))
        return [ChunkInfo.view(c, "gpu", c.is_active) for c in chunks]

    pooled = Catalog(
        catalog.registry,
        window=lambda: WINDOW,
        opening=lambda: 0,
        describe=describe,
        on_activate=lambda chunk, before: activated.append((chunk.hash, before)),
    )
    doc, question = chunks["doc"], chunks["question"]
    assert {c.tier for c in pooled.list_chunks()} == {"gpu"} and described == [4]
    pooled.activate_chunk(doc.hash)
    chunk = pooled.activate_chunk(question.hash)
    assert chunk.tier == "gpu" and chunk.is_active
    assert activated == [(doc.hash, []), (question.hash, [doc.hash])]
    assert issubclass(ContextManager, Catalog)


@pytest.mark.parametrize(
    ("config", "window"),
    [
        ({"max_position_embeddings": 8192}, 8192),
        ({"max_position_embeddings": 32768, "sliding_window": 4096}, 4096),  # Mistral v0.1
        ({"max_position_embeddings": 32768, "sliding_window": None}, 32768),
        (
            {"max_position_embeddings": 32768, "sliding_window": 4096, "use_sliding_window": False},
            32768,
        ),
    ],
)
def test_the_window_is_what_the_model_attends_to_at_once(config, window):
    assert context_window(config) == window
