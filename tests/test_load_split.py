"""load_file(split_tokens=N): a text file as consecutive chunks of at most N tokens, cut at
paragraph ends, else sentence ends, else words, else characters (never inside one)."""

from __future__ import annotations

import math
import random

import pytest

from kvchunks.common import ContextWindowExceeded
from kvchunks.engine import LLM, EngineConfig
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
from kvchunks.service.text_parts import split_text

WORDS = [
    "harbour",
    "ferry",
    "captain",
    "lighthouse",
    "keeper",
    "island",
    "morning",
    "tide",
    "north",
    "quay",
    "granite",
]


def notes(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words))


def count_words(text: str) -> int:
    return len(text.split())


def test_split_text_joins_whole_paragraphs_while_they_fit():
    text = "One two three.\n\nFour five.\n\nSix seven eight.\n\n \nNine ten eleven."
    assert split_text(text, 5, count_words) == [
        "One two three.\n\nFour five.\n\n",
        "Six seven eight.\n\n \n",
        "Nine ten eleven.",
    ]


def test_split_text_cuts_a_long_paragraph_at_sentence_ends_then_words():
    text = "Short one.\n\nA b c. D e f g! H i j k l m n o p q? R s.\n\nEnd here."
    assert split_text(text, 4, count_words) == [
        "Short one.\n\n",
        "A b c. ",  # the paragraph is too long: sentences, joined while they fit
        "D e f g! ",
        "H i j k ",  # a sentence too long: words
        "l m n o ",
        "p q? ",
        "R s.\n\n",
        "End here.",
    ]


def test_split_text_cuts_a_word_longer_than_n_between_characters():
    assert split_text("abcdefgh ij", 3, len) == ["abc", "def", "gh ", "ij"]
    assert split_text("  \n\nx y", 1, count_words) == ["  \n\nx ", "y"]  # no part is blank


def test_a_file_splits_at_sentence_ends_into_parts_of_at_most_n_tokens(make_cm, tmp_path):
    text = notes(400)
    path = tmp_path / "notes.txt"
    path.write_text(text)
    cm = make_cm()
    tokenizer = cm.store.model.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    parts = cm.load_file(path, tags=["notes"], split_tokens=100)
    assert len(parts) >= math.ceil(len(ids) / 100) > 2
    assert "".join(p.text for p in parts) == text
    for i, part in enumerate(parts):
        assert len(tokenizer.encode(part.text, add_special_tokens=False)) <= 100
        assert part.text.endswith(". ") or i == len(parts) - 1  # no sentence here is too long
        assert part.token_ids == cm.store.model.chat.frame("system", part.text)
        assert part.metadata["part"] == i and part.metadata["parts"] == len(parts)
        assert part.metadata["source"] == str(path.resolve())
        assert part.tags == ["notes"] and part.kind == "input" and part.parent_chunks == []
        assert cm.add_chunk(part.text).hash == part.hash  # the standalone chunk of that text
    for part, after in zip(parts, parts[1:], strict=False):
        sentence = after.text[: after.text.index(". ") + 2]
        more = part.text + sentence  # the next sentence did not fit
        assert len(tokenizer.encode(more, add_special_tokens=False)) > 100
    assert sorted(c.hash for c in cm.list_chunks()) == sorted(p.hash for p in parts)
    assert [p.hash for p in cm.load_file(path, split_tokens=100)] == [p.hash for p in parts]


def test_a_split_keeps_paragraphs_whole_where_they_fit(make_cm, tmp_path):
    paragraphs = [notes(n, seed=n) + "\n\n" for n in (30, 12, 45, 20, 8, 33)]
    text = "".join(paragraphs)
    path = tmp_path / "paragraphs.txt"
    path.write_text(text)
    cm = make_cm()
    tokenizer = cm.store.model.tokenizer

    def tokens(t: str) -> int:
        return len(tokenizer.encode(t, add_special_tokens=False))

    limit = max(map(tokens, paragraphs)) + 5
    parts = cm.load_file(path, split_tokens=limit)
    assert "".join(p.text for p in parts) == text and len(parts) < len(paragraphs)
    assert all(tokens(p.text) <= limit for p in parts)
    next_paragraph = iter(paragraphs)
    for part in parts:  # each part is whole paragraphs, as many as fit
        taken = ""
        while taken != part.text:
            taken += next(next_paragraph)
            assert part.text.startswith(taken)
    for part, after in zip(parts, parts[1:], strict=False):
        first = after.text[: after.text.index("\n\n") + 2]
        assert tokens(part.text + first) > limit


def test_a_load_reports_each_layer_of_a_part_and_each_part_once_it_is_stored(make_cm, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(notes(120, seed=3))
    cm = make_cm()
    layers = cm.store.model.llm.model_config.num_layers
    seen = []

    def on_progress(done: int, total: int) -> None:
        seen.append((done, total, len(cm.list_chunks())))

    parts = cm.load_file(path, split_tokens=40, on_progress=on_progress)
    sizes = [p.token_count for p in parts]
    expected = [(0, sum(sizes), 0)]
    for i, size in enumerate(sizes):  # while a part is computed, it is not stored yet
        before = sum(sizes[:i])
        expected += [(before + size * j // layers, sum(sizes), i) for j in range(1, layers + 1)]
        expected.append((before + size, sum(sizes), i + 1))
    assert seen == expected
    seen.clear()
    whole = cm.load_file(path, on_progress=on_progress)
    n, stored = whole.token_count, len(parts)
    assert seen == [
        (0, n, stored),
        *[(n * j // layers, n, stored) for j in range(1, layers + 1)],
        (n, n, stored + 1),
    ]
    seen.clear()
    cm.load_file(path, on_progress=on_progress)  # stored already: nothing computed
    assert seen == [(0, n, stored + 1), (n, n, stored + 1)]


def test_a_split_never_cuts_a_character(make_cm, tmp_path):
    text = "Le café du port sert un thé 🍵 très chaud; 東京の港には船が多い。 " * 8
    path = tmp_path / "mixed.txt"
    path.write_text(text)
    cm = make_cm()
    parts = cm.load_file(path, split_tokens=13)
    assert "".join(p.text for p in parts) == text
    tokenizer = cm.store.model.tokenizer
    assert all(len(tokenizer.encode(p.text, add_special_tokens=False)) <= 13 for p in parts)


def test_a_file_longer_than_the_window_loads_only_when_split(tiny_checkpoint, tmp_path):
    # A small model (a window of 2,048 tokens) keeps the long file cheap to compute.
    llm = LLM(tiny_checkpoint("llama"), EngineConfig(kv_cache_bytes=64 << 20, block_size=16))
    store = ChunkStore(home=tmp_path / "home", llm=llm)
    try:
        cm = ContextManager(store=store)
        path = tmp_path / "long.txt"
        path.write_text(notes(2000, seed=1))
        with pytest.raises(ContextWindowExceeded, match="with --split N"):
            cm.load_file(path)
        assert cm.list_chunks() == []
        parts = cm.load_file(path, split_tokens=1000)
        assert len(parts) >= 3 and all(p.token_count < store.model.window for p in parts)
        assert sum(p.token_count for p in parts) > store.model.window
    finally:
        store.close()
    assert llm.block_manager.num_free == llm.block_manager.num_blocks
