"""ContextManager behaviour: dedup, provenance, contexts, restart, export/import, bad input."""

from __future__ import annotations

import threading

import pytest
import torch
from reference import bits
from test_packing import note

from kvchunks.common import (
    AmbiguousHash,
    CapacityError,
    ChunkFileError,
    ChunkInUse,
    ChunkNotFound,
    ContextWindowExceeded,
    InvalidInput,
)
from kvchunks.engine import SamplingParams
from kvchunks.service import generation
from kvchunks.service.context_manager import ContextManager
from kvchunks.service.model_host import ModelHost
from kvchunks.store.hashing import content_hash
from kvchunks.store.kv_file import kv_path

GREEDY = SamplingParams(temperature=0, max_tokens=16)
DOC = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."


def snapshot(cm) -> tuple:
    """Everything a bad call must leave unchanged: records, tags, active set, KV files."""
    chunks = cm.list_chunks()
    files = sorted(p.name for p in (cm.store.home / "kv").rglob("*.safetensors"))
    return (
        [(c.hash, tuple(c.tags), c.ref_count) for c in chunks],
        [c.hash for c in cm.context().chunks],
        files,
    )


def test_same_file_twice_is_one_chunk_and_one_kv_file(make_cm, tmp_path):
    cm = make_cm()
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    a = cm.load_file(doc)
    b = cm.load_file(doc)
    assert a.hash == b.hash and len(cm.list_chunks()) == 1
    assert len(list((cm.store.home / "kv").rglob("*.safetensors"))) == 1
    other = make_cm(at=tmp_path / "elsewhere").load_file(doc)
    assert other.hash == a.hash  # stable across stores and processes: a content address


def test_content_hash_finds_the_same_text_in_other_contexts(make_cm):
    cm = make_cm(auto_activate=True)
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    first = cm.generate("Repeat: hello", GREEDY)
    cm.clear()
    alone = cm.generate("Repeat: hello", GREEDY)
    assert alone.prompt_chunk.hash != first.prompt_chunk.hash
    assert alone.prompt_chunk.content_hash == first.prompt_chunk.content_hash
    same = cm.registry.by_content(first.prompt_chunk.content_hash)
    assert set(same) == {first.prompt_chunk.hash, alone.prompt_chunk.hash}
    assert [c.hash for c in cm.same_text(first.prompt_chunk.hash)] == [alone.prompt_chunk.hash]
    found = cm.same_text(alone.prompt_chunk.hash[:10])  # a prefix, as everywhere
    assert [(c.hash, c.is_active) for c in found] == [(first.prompt_chunk.hash, False)]
    assert cm.same_text(doc.hash) == []


def test_generation_provenance(make_cm):
    cm = make_cm()
    doc = cm.add_chunk(DOC, tags=["facts"])
    cm.activate_chunk(doc.hash[:6])
    g = cm.generate("What is the code?", GREEDY)
    assert g.prompt_chunk.parent_chunks == [doc.hash]
    assert g.output_chunk.parent_chunks == [doc.hash, g.prompt_chunk.hash]
    assert g.output_chunk.kind == "output" and g.output_chunk.role == "assistant"
    assert g.output_chunk.generation_params["temperature"] == 0
    assert g.output_chunk.generation_params["mode"] == "realign"  # the default
    assert set(cm.registry.children(doc.hash)) == {g.prompt_chunk.hash, g.output_chunk.hash}
    assert not g.prompt_chunk.is_active and not g.output_chunk.is_active
    assert g.text and g.output_chunk.text.startswith(g.text.strip()[:5])


def test_auto_activate_returns_the_new_chunks_as_active(make_cm):
    cm = make_cm(auto_activate=True, output_tokens=4)
    g = cm.generate("Say hi.", GREEDY)
    made = [g.prompt_chunk, *g.output_chunks]
    assert len(made) > 2 and all(c.is_active for c in made)  # as they are afterwards
    assert [c.hash for c in cm.context().chunks] == [c.hash for c in made]
    document = g.to_json()
    assert document["prompt_chunk"]["is_active"] and document["output_chunk"]["is_active"]


def test_output_granularity_per_n_tokens_and_manual(make_cm):
    cm = make_cm(output_tokens=5)
    g = cm.generate("Count from one to twenty.", SamplingParams(temperature=0, max_tokens=14))
    sizes = [c.token_count for c in g.output_chunks]
    assert len(sizes) >= 3 and all(s == 5 for s in sizes[:-1])
    assert g.output_chunks[1].parent_chunks[-1] == g.output_chunks[0].hash
    cm.configure(output_tokens="manual")
    assert cm.generate("Say hi.", GREEDY).output_chunk is None
    with cm.track_output() as out:
        tracked = cm.generate("Say hi.", GREEDY)
    assert out.get_chunk().hash == tracked.output_chunk.hash


def test_contexts_are_independent_over_one_store(make_cm):
    alice = make_cm("alice")
    bob = alice.with_context("bob")
    doc = alice.add_chunk(DOC)
    alice.activate_chunk(doc.hash)
    assert [c.hash for c in alice.context().chunks] == [doc.hash]
    assert bob.context().chunks == []
    view = alice.context()  # reads as its active chunks
    assert len(view) == 1 and [c.hash for c in view] == [doc.hash] and len(bob.context()) == 0
    assert alice.get_chunk(doc.hash).is_active and not bob.get_chunk(doc.hash).is_active
    with_doc = alice.generate("What is the code of the vault?", GREEDY)
    without = bob.generate("What is the code of the vault?", GREEDY)
    assert with_doc.text != without.text


def test_restart_keeps_chunks_tags_provenance_and_answers(make_cm, home):
    cm = make_cm()
    doc = cm.add_chunk(DOC, tags=["facts"])
    cm.activate_chunk(doc.hash)
    g = cm.generate("Where is the vault?", GREEDY)
    cm.activate_chunk(g.prompt_chunk.hash)
    cm.activate_chunk(g.output_chunk.hash)
    before = cm.generate("And its code?", GREEDY)
    cm.move_to_cpu(g.prompt_chunk.hash)
    cm.archive_to_disk(doc.hash)
    listed = [(c.hash, c.tags, c.parent_chunks, c.tier) for c in cm.list_chunks()]
    assert {c.tier for c in cm.list_chunks()} == {"gpu", "cpu", "disk"}
    cm.store.close()

    again = make_cm(at=home)
    assert [(c.hash, c.tags, c.parent_chunks, c.tier) for c in again.list_chunks()] == listed
    assert [c.hash for c in again.context().chunks] == [
        doc.hash,
        g.prompt_chunk.hash,
        g.output_chunk.hash,
    ]
    after = again.generate("And its code?", GREEDY)
    assert after.text == before.text
    assert again.store.stats["file_loads"] >= 3 and again.store.stats["recomputes"] == 0


def test_a_chunk_that_cannot_be_restored_does_not_stop_the_restart(make_cm, home):
    """Its file lost and a chunk it was computed after deleted: it is left out of the pool
    (a use of it says why), and the chunks after it in the registry are restored."""
    cm = make_cm()
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    g = cm.generate("Where is the vault?", GREEDY)
    cm.deactivate_chunk(doc.hash)
    cm.delete_chunk(doc.hash)
    kv_path(home, g.prompt_chunk.hash).unlink()
    later = cm.add_chunk("The mill was built in 1820.")
    cm.store.close()
    again = make_cm(at=home)
    assert again.get_chunk(g.prompt_chunk.hash).tier == "disk"
    assert again.get_chunk(later.hash).tier == "gpu" and later.hash in again.store.tiers.kv
    with pytest.raises(ChunkNotFound, match="cannot be rebuilt"):
        again.move_to_gpu(g.prompt_chunk.hash)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_or_missing_kv_file_is_recomputed_bitwise(make_cm, home, damage):
    cm = make_cm()
    doc = cm.add_chunk(DOC)
    k, v = cm.store.model.llm.read_kv(doc.segments)
    cm.store.close()
    path = kv_path(home, doc.hash)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    {
        "flip": lambda: path.write_bytes(bytes(data)),
        "truncate": lambda: path.write_bytes(bytes(data[: len(data) // 2])),
        "delete": path.unlink,
    }[damage]()
    again = make_cm(at=home)
    again.populate(doc.hash[:8])
    assert again.store.stats["bad_files"] == (damage != "delete")
    assert again.store.stats["recomputes"] == 1
    k2, v2 = again.store.model.llm.read_kv(again.get_chunk(doc.hash).segments)
    assert bits(k2) == bits(k) and bits(v2) == bits(v)
    assert again.store.loader.load(again.get_chunk(doc.hash)) is not None  # a sound file again


def test_export_import_between_data_directories(make_cm, tmp_path):
    cm = make_cm()
    doc = cm.add_chunk(DOC, tags=["facts"])
    target = cm.export_chunk(doc.hash, "doc.kvc")
    assert target.parent == (cm.store.home / "exports").resolve()
    with pytest.raises(InvalidInput):
        cm.export_chunk(doc.hash, "doc.kvc")
    cm.export_chunk(doc.hash, "doc.kvc", force=True)
    with pytest.raises(InvalidInput):
        cm.export_chunk(doc.hash, "../../escape.kvc")
    cm.compose_chunks([doc.hash, cm.add_chunk("More facts.").hash])  # counted here only
    cm.move_to_cpu(doc.hash)
    assert cm.export_chunk(doc.hash, "doc.kvc", force=True) == target
    assert cm.get_chunk(doc.hash).tier == "cpu"  # a read: the chunk stays where it is
    other = make_cm(at=tmp_path / "other")
    imported = other.import_chunk(target)
    assert imported.hash == doc.hash and imported.tags == ["facts"]
    other.delete_chunk(imported.hash)  # no views over it here
    imported = other.import_chunk(target)
    k1, v1 = cm.store.model.llm.read_kv(doc.segments)
    k2, v2 = other.store.model.llm.read_kv(imported.segments)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_import_refuses_corrupted_and_foreign_files(make_cm, tmp_path, model_path):
    cm = make_cm()
    target = cm.export_chunk(cm.add_chunk(DOC).hash, tmp_path / "doc.kvc")
    other = make_cm(at=tmp_path / "other")
    before = snapshot(other)
    broken = tmp_path / "broken.kvc"
    broken.write_bytes(target.read_bytes()[:-50])
    with pytest.raises(ChunkFileError):
        other.import_chunk(broken)
    from kvchunks.store.kv_file import read_kv_file, write_kv_file

    k, v, record, _ = read_kv_file(target)
    foreign = tmp_path / "foreign.kvc"
    write_kv_file(foreign, k, v, record, "0" * 64)
    with pytest.raises(ChunkFileError):
        other.import_chunk(foreign)
    wrong_dtype = tmp_path / "bf16.kvc"
    write_kv_file(wrong_dtype, k.bfloat16(), v.bfloat16(), record, cm.store.model.fingerprint)
    with pytest.raises(ChunkFileError):
        other.import_chunk(wrong_dtype)
    # Another text's tokens under the document's hashes (a sound file, written anew): the
    # same document loaded there would return it.
    tokens = cm.store.model.chat.frame("system", "Tickets cost twelve euros.")
    forged_tokens = (tokens * k.shape[1])[: k.shape[1]]
    for content in (record["content_hash"], content_hash(forged_tokens)):
        forged = tmp_path / "forged.kvc"
        forged_record = record | {"token_ids": forged_tokens, "content_hash": content}
        write_kv_file(forged, k, v, forged_record, cm.store.model.fingerprint)
        with pytest.raises(InvalidInput, match="hash is not that of its tokens"):
            other.import_chunk(forged)
    assert snapshot(other) == before


def test_bad_input_is_refused_without_state_change(make_cm, tmp_path):
    cm = make_cm()
    a = cm.add_chunk(DOC)
    cm.activate_chunk(a.hash)
    view = cm.compose_chunks([a.hash, cm.add_chunk("Another document.").hash])
    lone = cm.add_chunk("A note no view reads.")
    before = snapshot(cm)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01\x02abc")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "notes.txt").write_text("Two words.")
    cases = [
        (ChunkNotFound, lambda: cm.activate_chunk("deadbeef")),
        (InvalidInput, lambda: cm.activate_chunk("xyz!")),
        (InvalidInput, lambda: cm.get_chunk("ab")),
        (InvalidInput, lambda: cm.load_file(tmp_path / "missing.txt")),
        (InvalidInput, lambda: cm.load_file(tmp_path / "empty.txt")),
        (InvalidInput, lambda: cm.load_file(tmp_path / "binary.bin")),
        (InvalidInput, lambda: cm.load_file(tmp_path / "latin1.txt")),
        (InvalidInput, lambda: cm.add_chunk("")),
        (InvalidInput, lambda: cm.add_chunk("x", role="robot")),
        (InvalidInput, lambda: cm.add_chunk("lone \ud800 surrogate")),
        (InvalidInput, lambda: cm.add_chunk("x", tags="one-string")),
        (InvalidInput, lambda: cm.add_chunk("x", metadata="not a mapping")),
        (InvalidInput, lambda: cm.add_chunk("x", metadata={"dtype": "csv"})),
        (InvalidInput, lambda: cm.add_chunk("x", metadata={"when": object()})),
        (InvalidInput, lambda: cm.add_chunk("x", metadata={"score": float("nan")})),  # not JSON
        (InvalidInput, lambda: cm.add_chunk("x", metadata={"raw": b"\x00\x01"})),
        (InvalidInput, lambda: cm.load_file(tmp_path / "notes.txt", split_tokens=True)),
        (InvalidInput, lambda: cm.split_chunk(a.hash, True)),
        (InvalidInput, lambda: cm.compose_chunks(None)),
        (InvalidInput, lambda: cm.reorder_chunks(None)),
        (InvalidInput, lambda: cm.delete_chunks(None)),
        (InvalidInput, lambda: cm.move_chunks(None, "cpu")),
        (InvalidInput, lambda: cm.generate("")),
        (InvalidInput, lambda: cm.generate("hi", mode="fast")),
        (InvalidInput, lambda: cm.split_chunk(a.hash, 0)),
        (InvalidInput, lambda: cm.split_chunk(a.hash, a.token_count)),
        (InvalidInput, lambda: cm.compose_chunks([a.hash])),
        (InvalidInput, lambda: cm.tag_chunk(a.hash, "two words")),
        (InvalidInput, lambda: cm.configure(mode="fast")),
        (InvalidInput, lambda: cm.configure(auto_activate="no")),
        (InvalidInput, lambda: cm.configure(output_tokens=True)),
        (InvalidInput, lambda: cm.with_context("no spaces allowed")),
        (InvalidInput, lambda: cm.delete_chunk(lone.hash, cascade="no")),
        (InvalidInput, lambda: cm.generate("hi", params={"max_tokens": 3})),
        (InvalidInput, lambda: cm.generate("hi", on_text="print")),
        (InvalidInput, lambda: cm.chat([{"role": "user", "content": "hi"}], store="no")),
        (InvalidInput, lambda: cm.chat([{"role": "user", "content": "hi"}], chunks=a.hash)),
        (InvalidInput, lambda: cm.move_chunks([lone.hash], "cpu", on_progress="bar")),
        (InvalidInput, lambda: cm.list_chunks(5)),
        (InvalidInput, lambda: cm.load_file(5)),
        (InvalidInput, lambda: cm.import_chunk(5)),
        (InvalidInput, lambda: cm.export_chunk(lone.hash, tmp_path / "lone.kvc", force="no")),
        (InvalidInput, lambda: cm.export_chunk(lone.hash, tmp_path)),
        (ChunkInUse, lambda: cm.delete_chunk(a.hash)),
        (ChunkInUse, lambda: cm.delete_chunks([lone.hash, a.hash])),  # all or none
        (ContextWindowExceeded, lambda: cm.add_chunk("word " * 9000)),
        (ContextWindowExceeded, lambda: cm.generate("hi", SamplingParams(max_tokens=9000))),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert snapshot(cm) == before, error
    # A value of the wrong type is named as such, not as one out of range or empty.
    with pytest.raises(InvalidInput, match="^the prompt must be a string, got int$"):
        cm.generate(5)
    with pytest.raises(InvalidInput, match="^a chunk's text must be a string, got bytes$"):
        cm.add_chunk(b"The ferry leaves at nine.")
    with pytest.raises(InvalidInput, match="^split point must be a whole number, got '3'$"):
        cm.split_chunk(a.hash, "3")
    assert snapshot(cm) == before
    assert view.ref_count == 0 and cm.get_chunk(a.hash).ref_count == 1


def test_ambiguous_prefix_lists_candidates(make_cm):
    import dataclasses

    cm = make_cm()
    a = cm.add_chunk(DOC)
    twin_hash = a.hash[:6] + ("0" if a.hash[6] != "0" else "1") + a.hash[7:]
    cm.registry.put(dataclasses.replace(a, hash=twin_hash, segments=[]))
    assert cm.get_chunk(a.hash[:7]).hash == a.hash
    with pytest.raises(AmbiguousHash) as err:
        cm.activate_chunk(a.hash[:6])
    assert a.hash[:12] in str(err.value) and twin_hash[:12] in str(err.value)
    assert cm.context().chunks == []


def test_activation_past_the_window_is_refused(make_cm):
    cm = make_cm()
    page = cm.add_chunk("lorem ipsum dolor sit amet " * 200)
    # Views cost no compute, so a window-sized context is cheap to build.
    repeats = cm.store.model.window // page.token_count
    book = cm.compose_chunks([page.hash] * repeats)
    cm.activate_chunk(book.hash)
    before = snapshot(cm)
    with pytest.raises(ContextWindowExceeded) as refused:
        cm.activate_chunk(page.hash)
    named = f"(the first 1 active, {book.hash[:12]}, free {book.token_count} tokens)"
    assert str(refused.value).endswith(f"deactivate something first {named}")
    # Nor is a view made that could never be active.
    with pytest.raises(ContextWindowExceeded, match="compose fewer chunks"):
        cm.compose_chunks([page.hash] * (repeats + 1))
    assert snapshot(cm) == before


def test_chunks_activated_together_that_overflow_are_refused_as_one_request(make_cm):
    """activate_chunks is all or none: the refusal names the chunks together, not the one
    that would have overflowed (it would blame those before it)."""
    cm = make_cm("activate-together")
    page = cm.add_chunk("lorem ipsum dolor sit amet " * 200)
    more_than_half = cm.store.model.window // page.token_count // 2 + 1
    a, b = (cm.compose_chunks([page.hash] * n) for n in (more_than_half, more_than_half + 1))
    before = snapshot(cm)
    with pytest.raises(ContextWindowExceeded) as refused:
        cm.activate_chunks([a.hash, b.hash[:8]])
    adding = a.token_count + b.token_count
    says = f"activating 2 chunks ({adding} tokens) would make {adding} active tokens"
    assert str(refused.value).startswith(says)
    assert "activate fewer, or deactivate something first" in str(refused.value)
    assert snapshot(cm) == before


def test_a_generation_past_the_window_names_the_first_chunks_that_make_room(make_tiny_store):
    """A conversation that fills the window is refused with the fewest chunks, first in the
    layout, whose deactivation makes room; deactivating them, the same call answers."""
    cm = ContextManager(store=make_tiny_store(), mode="reuse")
    window, opening = cm.store.model.window, cm.store.composer.opening_length
    first, second = cm.add_chunk(note(1, 40), role="raw"), cm.add_chunk(note(2, 40), role="raw")
    page = cm.add_chunk(note(0, 100), role="raw")
    book = cm.compose_chunks([page.hash] * (window // 100 - 3))
    for chunk in (first, second, book):
        cm.activate_chunk(chunk.hash)
    question = "Go on."
    asked = len(cm.store.model.chat.prompt(question)) + len(cm.store.model.chat.turn_end)
    room = window - opening - book.token_count - asked  # for the answer, without the notes
    params = SamplingParams(temperature=0, max_tokens=room - 10, ignore_eos=True)
    before = snapshot(cm)
    with pytest.raises(ContextWindowExceeded) as refused:
        cm.generate(question, params)  # 70 over: the two notes (80 tokens) make room
    named = f"{first.hash[:12]}, {second.hash[:12]}, free 80 tokens"
    assert f"by 70; deactivate chunks (the first 2 active, {named}) or lower" in str(refused.value)
    assert snapshot(cm) == before
    cm.deactivate_chunk(first.hash)
    cm.deactivate_chunk(second.hash)
    assert cm.generate(question, params).output_chunk is not None
    # Deactivating every chunk would not make room: the prompt (or max_tokens) is the cause.
    with pytest.raises(ContextWindowExceeded, match="; shorten the prompt or lower max_tokens$"):
        cm.generate(question, SamplingParams(max_tokens=window))
    cm.clear()
    with pytest.raises(ContextWindowExceeded, match="; shorten the prompt or lower max_tokens$"):
        cm.generate(question, SamplingParams(max_tokens=window))  # nothing active to name


def test_an_answer_and_its_closing_must_fit_the_window(make_tiny_store):
    """An answer cut at max_tokens is closed the way the template closes a turn, and stored
    so: room for max_tokens but not for the closing is refused before anything runs; room
    for both gives an answer that is stored and, under auto-activate, active."""
    cm = ContextManager(store=make_tiny_store(), auto_activate=True, mode="reuse")
    window = cm.store.model.window
    page = cm.add_chunk(note(0, 100), role="raw")
    book = cm.compose_chunks([page.hash] * (window // 100 - 1))
    cm.activate_chunk(book.hash)
    question = "Go on."
    opening = cm.store.composer.opening_length  # every context starts with it
    room = window - opening - book.token_count - len(cm.store.model.chat.prompt(question))
    before = snapshot(cm)
    with pytest.raises(ContextWindowExceeded):
        cm.generate(question, SamplingParams(temperature=0, max_tokens=room, ignore_eos=True))
    assert snapshot(cm) == before
    answer_room = room - len(cm.store.model.chat.turn_end)
    greedy = SamplingParams(temperature=0, max_tokens=answer_room, ignore_eos=True)
    result = cm.generate(question, greedy)
    assert result.output_chunk.is_active and cm.context().token_count <= window


def test_concurrent_activations_never_pass_the_window(make_cm):
    cm, other = make_cm("race"), make_cm("race")  # two clients of one context
    page = cm.add_chunk("lorem ipsum dolor sit amet " * 200)
    over_half = cm.store.model.window // (2 * page.token_count) + 1
    books = [cm.compose_chunks([page.hash] * n) for n in (over_half, over_half + 1)]
    assert all(b.token_count <= cm.store.model.window for b in books)
    # Both read the empty active list before either writes: the race activation must settle.
    barrier, results = threading.Barrier(2), {}
    for manager in (cm, other):
        registry = manager.registry
        registry.find_with_active = _stalled_once(registry.find_with_active, barrier)

    def activate(manager, book) -> None:
        try:
            results[book.hash] = manager.activate_chunk(book.hash).hash
        except ContextWindowExceeded as e:
            results[book.hash] = e

    racers = [
        threading.Thread(target=activate, args=pair, name="racer")
        for pair in zip((cm, other), books, strict=True)
    ]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    outcomes = sorted(type(r).__name__ for r in results.values())
    assert outcomes == ["ContextWindowExceeded", "str"]
    assert cm.context().token_count <= cm.store.model.window


def _stalled_once(read, barrier: threading.Barrier):
    """A registry read that makes each racer thread wait for the other after its first one."""
    waited: set[int] = set()

    def stalled(*args):
        got = read(*args)
        me = threading.get_ident()
        if threading.current_thread().name == "racer" and me not in waited:
            waited.add(me)
            barrier.wait(timeout=30)
        return got

    return stalled


def test_delete_with_views_needs_cascade(make_cm):
    cm = make_cm()
    a, b = cm.add_chunk(DOC), cm.add_chunk("Second document.")
    view = cm.compose_chunks([a.hash, b.hash])
    head, _ = cm.split_chunk(view.hash, 5)
    assert cm.get_chunk(a.hash).ref_count >= 1
    deleted = cm.delete_chunk(a.hash, cascade=True)
    assert a.hash in deleted and view.hash in deleted and head.hash in deleted
    assert not kv_path(cm.store.home, a.hash).exists()
    with pytest.raises(ChunkNotFound):
        cm.get_chunk(view.hash)
    assert cm.get_chunk(b.hash).ref_count == 0


@pytest.mark.parametrize("where", ["same store", "another store"])
def test_a_chunk_made_again_while_it_is_deleted_keeps_its_new_kv(make_cm, monkeypatch, where):
    """The same text loaded again while its chunk is being deleted, by the same store or by
    another on the same data directory (as the workers of a node are): the load waits for
    the delete to end, so the delete cannot take away the new chunk's file and pool KV."""
    cm = make_cm()
    loader = cm if where == "same store" else make_cm()
    doc = cm.add_chunk(DOC)
    deleted, loaded_again = threading.Event(), threading.Event()
    delete = cm.registry.delete

    def slow_delete(*args, **kwargs):
        delete(*args, **kwargs)
        deleted.set()
        loaded_again.wait(3)  # the load gets its chance (it waits for the locks instead)

    monkeypatch.setattr(cm.registry, "delete", slow_delete)
    deleting = threading.Thread(target=cm.delete_chunk, args=(doc.hash,))
    deleting.start()
    assert deleted.wait(60)
    again = []
    loading = threading.Thread(
        target=lambda: (again.append(loader.add_chunk(DOC)), loaded_again.set())
    )
    loading.start()
    deleting.join(60)
    loading.join(60)
    assert again[0].hash == doc.hash and loader.get_chunk(doc.hash).tier == "gpu"
    assert loader.store.files.is_sound(doc) and doc.hash in loader.store.tiers.kv


def test_chunks_computed_after_a_deleted_chunk_keep_working(make_cm):
    cm = make_cm()
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    g = cm.generate("Where is the vault?", GREEDY)
    cm.clear()
    for c in (g.prompt_chunk, g.output_chunk):
        cm.activate_chunk(c.hash)
    modes = ("reuse", "exact", "realign")
    before = {m: cm.generate("And its code?", GREEDY, mode=m).token_ids for m in modes}
    cm.delete_chunk(doc.hash)
    # What the children attend to does not depend on whether their parent still exists.
    assert {m: cm.generate("And its code?", GREEDY, mode=m).token_ids for m in modes} == before
    # Their KV cannot be rebuilt without it, though: a lost file says so.
    cm.archive_to_disk(g.output_chunk.hash)
    kv_path(cm.store.home, g.output_chunk.hash).unlink()
    with pytest.raises(ChunkNotFound, match="cannot be rebuilt"):
        cm.populate(g.output_chunk.hash)
    # The same text loaded again is the same chunk: its children are its children again.
    assert cm.add_chunk(DOC).hash == doc.hash
    assert cm.provenance(g.prompt_chunk.hash)[0][0].hash == doc.hash
    assert g.prompt_chunk.hash in cm.registry.children(doc.hash)


def test_a_chat_refused_after_its_messages_were_computed_keeps_none_of_them(make_cm, monkeypatch):
    cm = make_cm()
    before = snapshot(cm)

    def refused(*_):
        raise CapacityError("the gpu tier is full")

    monkeypatch.setattr(generation, "generate", refused)
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ]
    with pytest.raises(CapacityError):
        cm.chat(messages, GREEDY)
    assert snapshot(cm) == before


@pytest.mark.parametrize("call", ["generate", "chat"])
def test_an_answer_that_cannot_be_stored_leaves_no_prompt_behind(make_cm, monkeypatch, call):
    """The prompt is stored first, then the answer; when the answer's record is refused
    (here: a full disk), the call changes nothing, its new prompt chunk included."""
    cm = make_cm()
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    before = snapshot(cm)
    register = cm.store.maker.register

    def disk_full_for_answers(chunk, segments, hold=None):
        if chunk.kind == "output":
            cm.store.tiers.free(segments)  # what register does with what it refuses
            raise CapacityError("the disk tier is full")
        return register(chunk, segments, hold)

    monkeypatch.setattr(cm.store.maker, "register", disk_full_for_answers)
    with pytest.raises(CapacityError):
        if call == "generate":
            cm.generate("Where is the vault?", GREEDY)
        else:
            cm.chat([{"role": "user", "content": "Where is the vault?"}], GREEDY)
    assert snapshot(cm) == before


def test_the_window_checks_count_the_opening(make_cm, monkeypatch):
    """Every chunk sits after the model's opening: a text that fits the window only without
    it is refused by the first check, with the remedy, before anything is computed."""
    cm = make_cm()
    framed = len(cm.store.model.chat.frame("system", DOC))
    monkeypatch.setattr(ModelHost, "window", property(lambda _: framed + 1))
    before = snapshot(cm)
    with pytest.raises(ContextWindowExceeded, match="opening.*split the text"):
        cm.add_chunk(DOC)
    assert snapshot(cm) == before


def test_activation_counts_the_opening_also_without_the_model(make_cm, monkeypatch, home):
    """A chunk that fits the window only without the opening is refused at activation (no
    generation could use it), by the manager and by the command line's quick catalog,
    which reads the opening's length that the engine recorded when it started."""
    from kvchunks import open_catalog

    cm = make_cm()
    doc = cm.add_chunk(DOC)
    opening = cm.store.composer.opening_length
    monkeypatch.setattr(ModelHost, "window", property(lambda _: doc.token_count + opening - 1))
    with pytest.raises(ContextWindowExceeded, match=f"after the model's {opening}-token opening"):
        cm.activate_chunk(doc.hash)
    with open_catalog(cm.store.model.path, home=home) as catalog:
        assert catalog.registry.opening(str(cm.store.model.path.resolve())) == opening > 0
    assert cm.context().chunks == []


def test_an_activate_and_deactivate_pair_takes_three_registry_round_trips(make_store, monkeypatch):
    """Toggling is on every request's path: the chunk and the active list are read in one
    round trip, the activation is one script, the deactivation one pipeline."""
    import redis.connection

    from kvchunks.service.context_manager import ContextManager

    cm = ContextManager(store=make_store(prefetch_policy="explicit"))
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    cm.deactivate_chunk(doc.hash)  # scripts registered, connections open
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, *args, **kwargs):
        if threading.current_thread() is threading.main_thread():  # not a background prefetch
            sent.append(command)
        return original(self, command, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    assert cm.activate_chunk(doc.hash).is_active
    assert not cm.deactivate_chunk(doc.hash).is_active
    assert len(sent) == 3


def test_streamed_text_never_shows_half_a_character(make_tiny_store, tiny_llm, monkeypatch):
    """A character whose bytes come in several tokens decodes as U+FFFD until its last byte
    comes: the stream waits for it, so the pieces add up to the answer."""
    from test_engine_batching import scripted

    cm = ContextManager(store=make_tiny_store())
    scripted(monkeypatch, tiny_llm, "你好世界, 😀!")
    pieces: list[str] = []
    params = SamplingParams(temperature=0, max_tokens=30)
    g = cm.generate("Say hello.", params, on_text=pieces.append)
    assert g.text == "你好世界, 😀!" and "".join(pieces) == g.text
    assert not any("\ufffd" in piece for piece in pieces)
