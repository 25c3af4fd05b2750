"""A chunk's tier says where its KV is, the same to every process on one registry: after an
interrupted load, and while another process holds the KV."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from kvchunks import open_catalog
from kvchunks.cli import render
from kvchunks.policies.budgets import TierBudgets
from kvchunks.service.context_manager import ContextManager


def recorded(store, hashes: list[str]) -> dict[str, str]:
    store.tiers.records.flush()
    return {c.hash: c.tier for c in store.registry.get_many(hashes)}


def test_an_interrupted_load_leaves_the_other_chunks_where_they_were(
    make_store, tmp_path, monkeypatch
):
    store = make_store(budgets=TierBudgets(gpu_blocks=4), prefetch_policy="explicit")
    cm = ContextManager(store=store)
    notes = [cm.add_chunk(f"Note {i}. " + "tide " * 240).hash for i in range(4)]
    where = {h: store.tiers.tier_of(h) for h in notes}
    assert set(where.values()) == {"gpu"} and recorded(store, notes) == where
    free = store.model.llm.pool_usage()["free"]
    path = tmp_path / "long.txt"
    path.write_text("harbour " * 600)  # needs the pool room of several notes

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the file's KV is being computed

    monkeypatch.setattr(store.model.llm.runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cm.load_file(path)
    assert {h: store.tiers.tier_of(h) for h in notes} == where  # back in the pool
    assert recorded(store, notes) == where  # and recorded so
    assert store.model.llm.pool_usage()["free"] == free
    assert [c.hash for c in cm.list_chunks()] == notes


def test_every_process_shows_the_tier_of_the_process_that_holds_the_kv(make_store):
    holder = ContextManager(store=make_store())
    note = holder.add_chunk("The ferry leaves at nine.")
    # Another process on the same registry, with its own pool, which holds none of it.
    other = ContextManager(store=make_store(restore=False))
    assert other.store.tiers.tier_of(note.hash) == "disk"
    catalog = open_catalog(other.store.model.path, home=other.store.home)
    try:
        for tier, move in (("gpu", None), ("cpu", holder.move_to_cpu), ("gpu", holder.move_to_gpu)):
            if move is not None:
                move(note.hash)
            holder.store.tiers.records.flush()
            seen = [cm.get_chunk(note.hash).tier for cm in (holder, other, catalog)]
            assert seen == [tier] * 3
        chunk = other.get_chunk(note.hash)
        assert chunk.tier == "gpu" and chunk.segments == []
        console = Console(file=io.StringIO(), width=200)
        console.print(render.info_table(chunk, [], [], [], []))
        shown = console.file.getvalue()
        assert "not in the pool" not in shown and "the process that holds it" in shown
    finally:
        catalog.close()
