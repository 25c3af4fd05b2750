"""load_file(split_tokens=N): a text file as consecutive chunks of N tokens each."""

from __future__ import annotations

import math
import random

import pytest

from kvchunks.common import ContextWindowExceeded
from kvchunks.engine import LLM, EngineConfig
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager

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


def test_a_file_splits_into_consecutive_chunks_of_n_tokens(make_cm, tmp_path):
    text = notes(400)
    path = tmp_path / "notes.txt"
    path.write_text(text)
    cm = make_cm()
    tokenizer = cm.store.model.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    parts = cm.load_file(path, tags=["notes"], split_tokens=100)
    assert len(parts) == math.ceil(len(ids) / 100) > 2
    assert "".join(p.text for p in parts) == text
    for i, part in enumerate(parts):
        # Tokens [100 i, 100 (i + 1)) of the file, framed as a system turn of their own.
        assert tokenizer.encode(part.text, add_special_tokens=False) == ids[i * 100 : i * 100 + 100]
        assert part.token_ids == cm.store.model.chat.frame("system", part.text)
        assert part.metadata["part"] == i and part.metadata["parts"] == len(parts)
        assert part.metadata["source"] == str(path.resolve())
        assert part.tags == ["notes"] and part.kind == "input" and part.parent_chunks == []
        assert cm.add_chunk(part.text).hash == part.hash  # the standalone chunk of that text
    assert sorted(c.hash for c in cm.list_chunks()) == sorted(p.hash for p in parts)
    assert [p.hash for p in cm.load_file(path, split_tokens=100)] == [p.hash for p in parts]


@pytest.mark.xfail(
    strict=True,
    reason="load_file splits token ids and decodes each part: a split inside a multi-byte "
    "character turns it into U+FFFD in both parts",
)
def test_a_split_never_cuts_a_character(make_cm, tmp_path):
    text = "Le café du port sert un thé 🍵 très chaud; 東京の港には船が多い。 " * 8
    path = tmp_path / "mixed.txt"
    path.write_text(text)
    parts = make_cm().load_file(path, split_tokens=13)
    assert "".join(p.text for p in parts) == text


def test_a_file_longer_than_the_window_loads_only_when_split(tiny_checkpoint, tmp_path):
    # A small model (a window of 2,048 tokens) keeps the long file cheap to compute.
    llm = LLM(tiny_checkpoint("llama"), EngineConfig(kv_cache_bytes=64 << 20, block_size=16))
    store = ChunkStore(home=tmp_path / "home", llm=llm)
    try:
        cm = ContextManager(store=store)
        path = tmp_path / "long.txt"
        path.write_text(notes(2000, seed=1))
        with pytest.raises(ContextWindowExceeded):
            cm.load_file(path)
        assert cm.list_chunks() == []
        parts = cm.load_file(path, split_tokens=1000)
        assert len(parts) >= 3 and all(p.token_count < store.model.window for p in parts)
        assert sum(p.token_count for p in parts) > store.model.window
    finally:
        store.close()
    assert llm.block_manager.num_free == llm.block_manager.num_blocks
