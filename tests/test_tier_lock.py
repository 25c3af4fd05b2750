"""A move to host memory copies the KV out of the pool without the pool's lock: others use
the pool meanwhile, and a chunk deleted or moved by them meanwhile is left as they made it,
with every block reference given back, also when the copy is interrupted. Room that only the
copied blocks can make waits for the copy."""

from __future__ import annotations

import threading

import pytest
import torch
from test_packing import kv_of, note

from kvchunks.engine import SamplingParams
from kvchunks.policies.budgets import TierBudgets
from kvchunks.service.context_manager import ContextManager


@pytest.fixture
def cm(make_tiny_store) -> ContextManager:
    return ContextManager(store=make_tiny_store(prefetch_policy="explicit"))


def during_copy(store, monkeypatch, action) -> None:
    """Run action() while a move to host memory copies KV out of the pool (when it asks for
    the host memory to copy into)."""
    buffer = store.host.buffer

    def intercepted(nbytes: int) -> torch.Tensor:
        action()
        return buffer(nbytes)

    monkeypatch.setattr(store.host, "buffer", intercepted)


def in_other_thread(fn) -> bool:
    """Run fn in another thread; whether it finished within five seconds."""
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(5)
    return not worker.is_alive()


def test_the_pool_lock_is_free_while_the_kv_is_copied(cm, monkeypatch):
    store = cm.store
    chunk = cm.add_chunk(note(0, 100), role="raw")
    k0, v0 = kv_of(cm, chunk.hash)
    free = store.model.llm.pool_usage()["free"]
    acquired = []

    def try_lock():
        if store.lock.acquire(timeout=2):
            acquired.append(True)
            store.lock.release()

    during_copy(store, monkeypatch, lambda: in_other_thread(try_lock))
    assert cm.move_to_cpu(chunk.hash).tier == "cpu"  # the public path: ChunkStore.move_to_cpu
    assert acquired == [True]
    assert chunk.hash not in store.tiers.kv and cm.get_chunk(chunk.hash).tier == "cpu"
    k1, v1 = store.host.kv[chunk.hash]
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert store.model.llm.pool_usage()["free"] == free + 1  # its block, alone in it


@pytest.mark.parametrize("meanwhile", ["delete", "archive"])
def test_a_chunk_deleted_or_moved_during_the_copy_is_left_so(cm, monkeypatch, meanwhile):
    store = cm.store
    free = store.model.llm.pool_usage()["free"]
    chunk = cm.add_chunk(note(1, 100), role="raw")
    other = {"delete": cm.delete_chunk, "archive": cm.archive_to_disk}[meanwhile]
    done = []
    during_copy(store, monkeypatch, lambda: done.append(in_other_thread(lambda: other(chunk.hash))))
    assert store.tiers.to_host(cm.registry.get(chunk.hash))
    assert done == [True]  # not held up by the move
    assert chunk.hash not in store.host and chunk.hash not in store.tiers.kv
    assert store.model.llm.pool_usage()["free"] == free  # its block, and no reference left
    if meanwhile == "archive":
        assert cm.get_chunk(chunk.hash).tier == "disk"
    else:
        assert not cm.list_chunks()


def test_an_interrupted_copy_leaves_the_chunk_in_the_pool(cm, monkeypatch):
    store = cm.store
    bm = store.model.llm.block_manager
    chunk = cm.add_chunk(note(2, 100), role="raw")
    segments = store.tiers.kv[chunk.hash]
    counts = [bm.ref_counts[b] for s in segments for b in s.blocks]

    def interrupt():
        raise KeyboardInterrupt  # Ctrl-C in the middle of the copy

    during_copy(store, monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.tiers.to_host(cm.registry.get(chunk.hash))
    assert store.tiers.kv[chunk.hash] == segments and chunk.hash not in store.host
    assert [bm.ref_counts[b] for s in segments for b in s.blocks] == counts
    assert cm.get_chunk(chunk.hash).tier == "gpu"
    monkeypatch.undo()
    assert cm.move_to_cpu(chunk.hash).tier == "cpu"  # and it still moves


def test_room_only_a_running_copy_can_make_waits_for_it(make_tiny_store, monkeypatch):
    """A pool of one block whose chunk is being copied out, and a new chunk that needs that
    block: the new chunk waits for the copy to end, instead of being refused."""
    store = make_tiny_store(prefetch_policy="explicit", budgets=TierBudgets(gpu_blocks=1))
    cm = ContextManager(store=store)
    first = cm.add_chunk(note(0, 200), role="raw")
    k0, v0 = kv_of(cm, first.hash)
    copying, go = threading.Event(), threading.Event()
    during_copy(store, monkeypatch, lambda: copying.set() or go.wait(5))
    moved, added = [], []
    mover = threading.Thread(target=lambda: moved.append(store.tiers.to_host(first)))
    mover.start()
    assert copying.wait(5)
    waiting, finish = threading.Event(), store.tiers._finish_copies
    monkeypatch.setattr(store.tiers, "_finish_copies", lambda: waiting.set() or finish())
    adder = threading.Thread(target=lambda: added.append(cm.add_chunk(note(1, 200), role="raw")))
    adder.start()
    assert waiting.wait(5)  # it waits for the copy: not refused, and not served otherwise
    adder.join(0.2)
    assert adder.is_alive() and not added
    go.set()
    adder.join(5)
    mover.join(5)
    assert moved == [True] and len(added) == 1 and not store.tiers.copies
    assert cm.get_chunk(first.hash).tier == "cpu" and cm.get_chunk(added[0].hash).tier == "gpu"
    k1, v1 = store.host.kv[first.hash]
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    opening = len(store.tiers.opening_kv()[0].blocks)  # held outside the budget
    pool = store.model.llm.pool_usage()
    assert pool["free"] == pool["blocks"] - 1 - opening


@pytest.mark.parametrize("action", ["move", "delete"])
def test_an_answer_reads_the_kv_it_started_with(cm, action):
    """A chunk moved to host memory or deleted while an answer reads it: its pool blocks,
    let go by the move, are not handed to the next chunk loaded until the answer is done."""
    doc = cm.add_chunk(note(0, 100), role="raw")
    cm.activate_chunk(doc.hash)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = cm.generate("What does it say?", params)
    forget(cm, reference)
    free = cm.store.model.llm.pool_usage()["free"]

    def meanwhile(piece: str) -> None:
        if not done:
            done.append(piece)
            if action == "move":
                cm.move_to_cpu(doc.hash)
            else:
                cm.delete_chunk(doc.hash)
            # Other KV, in the blocks freed last (the doc's, were they freed).
            cm.add_chunk(note(10**98 - 1, 100), role="raw")

    done: list[str] = []
    answer = cm.generate("What does it say?", params, on_text=meanwhile)
    assert answer.token_ids == reference.token_ids
    forget(cm, answer)
    assert cm.store.model.llm.pool_usage()["free"] == free  # the note took the doc's block


def forget(cm, result) -> None:
    """Delete what a generation stored, so that the same question is computed afresh."""
    for made in (result.output_chunk, result.prompt_chunk):
        cm.delete_chunk(made.hash)
