"""gpu / cpu / disk tiers: exact round trips, LRU under budgets, prefetch, concurrency."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, OrderedDict

import pytest
import torch
from test_packing import note

from kvchunks.common import CapacityError
from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.policies.budgets import TierBudgets
from kvchunks.service import chunk_files, generation
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
from kvchunks.service.node_memory import Spilled
from kvchunks.store.kv_file import kv_path

GREEDY = SamplingParams(temperature=0, max_tokens=12)
DOC = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."


def kv_of(cm, chunk_hash):
    return cm.store.model.llm.read_kv(cm.store.composer.segments(cm.registry.get(chunk_hash)))


def test_round_trip_through_every_tier_is_bitwise(make_cm):
    cm = make_cm()
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    k0, v0 = kv_of(cm, doc.hash)
    answer = cm.generate("What is the code?", GREEDY).text
    assert cm.move_to_cpu(doc.hash).tier == "cpu" and doc.hash not in cm.store.tiers.kv
    assert cm.archive_to_disk(doc.hash).tier == "disk" and doc.hash not in cm.store.host
    assert cm.move_to_gpu(doc.hash).tier == "gpu"
    k1, v1 = kv_of(cm, doc.hash)
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    cm.archive_to_disk(doc.hash)
    assert cm.generate("What is the code?", GREEDY).text == answer  # brought back on use
    assert cm.get_chunk(doc.hash).tier == "gpu"


@pytest.mark.parametrize("tier", ["gpu", "cpu"])
def test_archiving_writes_a_damaged_file_again_from_the_copy_in_memory(make_cm, tier):
    cm = make_cm()
    doc = cm.add_chunk(DOC)
    k0, v0 = kv_of(cm, doc.hash)
    if tier == "cpu":
        cm.move_to_cpu(doc.hash)
    path = kv_path(cm.store.home, doc.hash)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # damaged after it was written
    path.write_bytes(bytes(data))
    assert cm.archive_to_disk(doc.hash).tier == "disk"
    assert cm.store.stats["bad_files"] == 1 and cm.store.files.is_sound(doc)
    before = cm.store.stats["recomputes"]
    cm.move_to_gpu(doc.hash)  # from the file: no recompute
    assert cm.store.stats["recomputes"] == before
    k1, v1 = kv_of(cm, doc.hash)
    assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_moves_before_the_engine_starts_report_the_tier_they_made(make_cm, model_path, home):
    chunk = make_cm().add_chunk(DOC)
    store = ChunkStore(model_path, home=home)  # another process: its engine is not started
    try:
        cm = ContextManager(store=store)
        assert cm.move_to_cpu(chunk.hash).tier == "cpu" and chunk.hash in store.host
        assert cm.get_chunk(chunk.hash).tier == "cpu"
        assert cm.archive_to_disk(chunk.hash).tier == "disk"
        assert [c.tier for c in cm.list_chunks()] == ["disk"]
        assert not store.model.started
    finally:
        store.close()
    assert make_cm().get_chunk(chunk.hash).tier == "disk"  # written when the store closed


def test_views_follow_their_sources(make_cm):
    cm = make_cm()
    a, b = cm.add_chunk(DOC), cm.add_chunk("Another document entirely.")
    view = cm.compose_chunks([a.hash, b.hash])
    assert cm.archive_to_disk(view.hash).tier == "disk"
    assert cm.get_chunk(a.hash).tier == "disk" and cm.get_chunk(b.hash).tier == "disk"
    cm.move_to_cpu(a.hash)
    assert cm.get_chunk(view.hash).tier == "disk"  # as far as its furthest source
    assert cm.move_to_gpu(view.hash).tier == "gpu"


def test_views_follow_their_sources_before_the_engine_starts(
    make_cm, model_path, home, monkeypatch
):
    cm = make_cm()
    a, b = cm.add_chunk(DOC), cm.add_chunk("Another document entirely.")
    view = cm.compose_chunks([a.hash, b.hash])
    cm.archive_to_disk(a.hash)
    cm.store.tiers.records.flush()
    store = ChunkStore(model_path, home=home)  # another process: its engine is not started
    try:
        fresh = ContextManager(store=store)
        assert fresh.get_chunk(view.hash).tier == "disk"  # a's tier, recorded by the other
        fresh.move_to_cpu(a.hash)  # recorded by this store, not yet written
        assert fresh.get_chunk(view.hash).tier == "cpu"  # a in cpu, b in gpu
        assert {c.hash: c.tier for c in fresh.list_chunks()}[view.hash] == "cpu"
        fresh.activate_chunk(view.hash)
        reads = []
        get_many = store.registry.get_many
        monkeypatch.setattr(store.registry, "get_many", lambda *a: reads.append(a) or get_many(*a))
        fresh.list_chunks()  # the sources are listed too: no more reads
        assert reads == []
        assert [c.tier for c in fresh.context().chunks] == ["cpu"]  # the view, then its sources
        assert [list(hashes) for hashes, *_ in reads] == [[view.hash], [a.hash, b.hash]]
        assert not store.model.started
    finally:
        store.close()


def test_lru_order_under_budgets_with_fifty_chunks(make_tiny_store, tiny_llm):
    # Chunks of one whole block each: packed or not, the gpu budget holds so many chunks.
    gpu_chunks, cpu_chunks = 6, 10
    budgets = TierBudgets(
        gpu_blocks=gpu_chunks, cpu_bytes=cpu_chunks * tiny_llm.runner.block_bytes()
    )
    store = make_tiny_store(budgets=budgets, prefetch_policy="explicit")
    cm = ContextManager(store=store)
    model: OrderedDict[str, None] = OrderedDict()  # the expected recency order

    def touch(h):
        model[h] = None
        model.move_to_end(h)

    made = []
    for i in range(50):
        made.append(cm.add_chunk(note(i, 256), role="raw").hash)
        touch(made[-1])
        if i % 7 == 6:  # use an old chunk again: it becomes the most recent
            old = made[i // 2]
            cm.move_to_gpu(old)
            touch(old)
        recent = list(model)[::-1]
        expected_gpu = set(recent[:gpu_chunks])
        expected_cpu = set(recent[gpu_chunks : gpu_chunks + cpu_chunks])
        assert set(store.tiers.kv) == expected_gpu, i
        assert set(store.host.kv) == expected_cpu, i
        assert store.host.used_bytes <= budgets.cpu_bytes
    tiers = {c.hash: c.tier for c in cm.list_chunks()}
    assert sum(t == "disk" for t in tiers.values()) == 50 - gpu_chunks - cpu_chunks
    assert all(kv_path(store.home, h).exists() for h in made)  # nothing is ever dropped


def test_active_chunks_are_never_evicted_and_a_full_pool_fails_cleanly(make_tiny_store):
    store = make_tiny_store(budgets=TierBudgets(gpu_blocks=3), prefetch_policy="explicit")
    cm = ContextManager(store=store)
    keep = [cm.add_chunk(note(i, 256), role="raw") for i in range(3)]  # a block each
    for c in keep:
        cm.activate_chunk(c.hash)
    before = ([c.hash for c in cm.list_chunks()], set(store.tiers.kv), store.files.used_bytes())
    with pytest.raises(CapacityError):
        cm.add_chunk("One chunk too many.")
    assert (
        [c.hash for c in cm.list_chunks()],
        set(store.tiers.kv),
        store.files.used_bytes(),
    ) == before
    cm.deactivate_chunk(keep[0].hash)
    newer = cm.add_chunk("One chunk too many.")
    assert cm.get_chunk(keep[0].hash).tier == "cpu"
    assert {keep[1].hash, keep[2].hash, newer.hash} == set(store.tiers.kv)


def test_what_a_running_generation_reads_stays_in_the_pool(make_tiny_store):
    """A generation pins what it reads (the active chunks and those its request names) until
    it ends: room that another request makes meanwhile moves other chunks, and none at all
    when only the pinned ones would free enough."""
    store = make_tiny_store(budgets=TierBudgets(gpu_blocks=3), prefetch_policy="explicit")
    cm = ContextManager(store=store)
    read, idle = (cm.add_chunk(note(i, 256), role="raw") for i in range(2))  # a block each
    tiers, made = [], []

    def meanwhile(text: str) -> None:  # another request, while the answer streams
        if made:
            return
        cm.move_to_gpu(idle.hash)  # used again: `read` is now the least recently used
        made.append(cm.with_context("other").add_chunk(note(2, 256), role="raw"))
        tiers.append((cm.get_chunk(read.hash).tier, cm.get_chunk(idle.hash).tier))

    messages = [{"role": "user", "content": "Which note is it?"}]
    cm.chat(messages, GREEDY, chunks=[read.hash], on_text=meanwhile)
    assert made and tiers == [("gpu", "cpu")]  # the least recently used stayed: it is read
    with store.tiers.pins.pinning([cm.get_chunk(h) for h in store.tiers.kv]):
        before = set(store.tiers.kv)
        with pytest.raises(CapacityError):
            cm.add_chunk(note(3, 256), role="raw")
        assert set(store.tiers.kv) == before
    assert not store.tiers.pins.counts


def test_making_room_ignores_an_active_chunk_deleted_meanwhile(make_tiny_store, monkeypatch):
    """Another process may delete an active chunk between the read of the active lists and
    the read of their records: it protects nothing then, and the room is made all the same."""
    store = make_tiny_store(budgets=TierBudgets(gpu_blocks=2), prefetch_policy="explicit")
    cm = ContextManager(store=store)
    idle, gone = cm.add_chunk(note(0, 256), role="raw"), cm.add_chunk(note(1, 256), role="raw")
    cm.delete_chunk(gone.hash)
    monkeypatch.setattr(store.registry, "contexts", lambda: ["default"])
    monkeypatch.setattr(store.registry, "active", lambda name: [gone.hash])
    cm.add_chunk(note(2, 256), role="raw")
    cm.add_chunk(note(3, 256), role="raw")
    assert cm.get_chunk(idle.hash).tier == "cpu"  # moved out to make the room


def test_a_chunk_brought_from_disk_to_host_memory_is_the_last_to_go_back(make_tiny_store, tiny_llm):
    """Host memory keeps its least recently used order for a chunk that came from disk: it
    was asked for last, so another chunk goes to disk to make room before it does."""
    budgets = TierBudgets(gpu_blocks=4, cpu_bytes=2 * tiny_llm.runner.block_bytes())
    store = make_tiny_store(budgets=budgets, prefetch_policy="explicit")
    cm = ContextManager(store=store)
    used_first, asked_last, newest = (cm.add_chunk(note(i, 256), role="raw") for i in range(3))
    cm.move_to_cpu(used_first.hash)
    cm.archive_to_disk(asked_last.hash)
    cm.move_to_cpu(asked_last.hash)
    cm.move_to_cpu(newest.hash)  # host memory holds two: one of the others goes to disk
    assert set(store.host.kv) == {asked_last.hash, newest.hash}
    assert cm.get_chunk(used_first.hash).tier == "disk"


class OneChunkNodeMemory:
    """A node's shared memory that holds one chunk: each spill drops the chunks before it and
    hands back the copies it held, as the TierManager does for a full HostStore."""

    def __init__(self):
        self.held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def spill(self, chunk_hash: str, k: torch.Tensor, v: torch.Tensor) -> Spilled:
        dropped = {h: (lambda chunk, kv=kv: kv) for h, kv in self.held.items()}
        self.held = {chunk_hash: (k.clone(), v.clone())}
        return Spilled(True, dropped)

    def unspill(self, chunk_hash: str) -> None:
        self.held.pop(chunk_hash, None)


def test_a_chunk_the_node_memory_drops_is_in_disk_with_a_sound_file(make_tiny_store):
    node = OneChunkNodeMemory()
    store = make_tiny_store(node_memory=node, prefetch_policy="explicit")
    cm = ContextManager(store=store)
    first, second, third = (cm.add_chunk(note(i, 256), role="raw") for i in range(3))
    k0, v0 = kv_of(cm, first.hash)
    path = kv_path(store.home, first.hash)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # damaged while its only sound copy is in the node's memory
    path.write_bytes(bytes(data))
    cm.move_to_cpu(first.hash)
    cm.move_to_cpu(second.hash)  # the node's memory drops the first
    assert list(node.held) == [second.hash]
    k1, v1 = store.files.load(first)  # written again from the copy dropped
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    # Dropped too: a chunk back in this pool (it stays gpu) and one deleted meanwhile.
    cm.move_to_gpu(second.hash)
    gone = "f" * 64
    node.held[gone] = (k0, v0)
    cm.move_to_cpu(third.hash)
    store.tiers.records.flush()
    tiers = {c.hash: c.tier for c in store.registry.get_many([first.hash, second.hash])}
    assert tiers == {first.hash: "disk", second.hash: "gpu"}
    assert not kv_path(store.home, gone).exists()


def test_a_prefetch_the_pool_has_no_room_for_leaves_host_memory_as_it_was(make_tiny_store):
    """The KV a prefetch read from disk goes to the pool through host memory; when the pool
    is full of active chunks, it does not stay there, over host memory's budget."""
    budgets = TierBudgets(gpu_blocks=1, cpu_bytes=1)  # no chunk fits host memory
    store = make_tiny_store(budgets=budgets, prefetch_policy="explicit")
    cm = ContextManager(store=store)
    waiting = cm.add_chunk(note(0, 256), role="raw")
    cm.archive_to_disk(waiting.hash)
    active = cm.add_chunk(note(1, 256), role="raw")
    cm.activate_chunk(active.hash)  # holds the pool's one block
    skipped = store.stats["prefetch_skipped"]
    cm.prefetch(waiting.hash)
    store.wait_for_transfers()
    assert store.stats["prefetch_skipped"] == skipped + 1
    assert waiting.hash not in store.host and store.host.used_bytes == 0
    assert cm.get_chunk(waiting.hash).tier == "disk"


@pytest.mark.parametrize("mode", ["exact", "reuse", "realign"])
def test_gpu_budget_holds_in_the_middle_of_a_generation(make_tiny_store, monkeypatch, mode):
    budget = 5  # one block per chunk: two active and three idle fill it
    store = make_tiny_store(budgets=TierBudgets(gpu_blocks=budget), prefetch_policy="explicit")
    cm = ContextManager(store=store, mode=mode)
    a, b, *idle = (cm.add_chunk(note(i, 256), role="raw") for i in range(5))
    for c in (a, b):  # b was not computed after a: exact and realign derive KV for it
        cm.activate_chunk(c.hash)
    bm, used = store.model.llm.block_manager, []
    allocate = bm.allocate
    opening = len(store.tiers.opening_kv()[0].blocks)  # the engine's, outside the budget

    def counted(n: int) -> list[int]:
        blocks = allocate(n)
        used.append(bm.num_blocks - bm.num_free - opening)
        return blocks

    monkeypatch.setattr(bm, "allocate", counted)
    cm.generate("Which fact is about y?", GREEDY)
    assert used and max(used) <= budget, used
    # Room for the answer (and the derived KV of b after a) was made by moving idle chunks.
    moved = [c for c in idle if cm.get_chunk(c.hash).tier == "cpu"]
    assert len(moved) == (1 if mode == "reuse" else 2)


def test_a_chunk_larger_than_host_memory_is_refused_and_moves_nothing(make_store):
    probe = make_store(at=None)
    small = ContextManager(store=probe).add_chunk("A short note.")
    small_bytes = sum(t.nbytes for t in probe.model.llm.read_kv(probe.tiers.kv[small.hash]))
    probe.close()
    store = make_store(budgets=TierBudgets(cpu_bytes=small_bytes * 4))
    cm = ContextManager(store=store)
    note = cm.add_chunk("A short note.")
    big = cm.add_chunk(DOC * 8)
    cm.move_to_cpu(note.hash)
    cm.archive_to_disk(big.hash)
    with pytest.raises(CapacityError, match="does not fit the cpu budget"):
        cm.move_to_cpu(big.hash)  # from disk
    assert cm.get_chunk(big.hash).tier == "disk" and set(store.host.kv) == {note.hash}
    cm.move_to_gpu(big.hash)
    with pytest.raises(CapacityError, match="does not fit the cpu budget"):
        cm.move_to_cpu(big.hash)  # from the pool: it stays there
    assert cm.get_chunk(big.hash).tier == "gpu" and set(store.host.kv) == {note.hash}


def test_chunks_moved_to_host_memory_together_must_fit_it_together(make_store):
    """Each fits, both do not: moved one after the other, the second would push the first
    on to disk while the call said both were in cpu. Refused before anything moves."""
    probe = make_store(at=None)
    one = ContextManager(store=probe).add_chunk("A short note.")
    one_bytes = sum(t.nbytes for t in probe.model.llm.read_kv(probe.tiers.kv[one.hash]))
    probe.close()
    store = make_store(budgets=TierBudgets(cpu_bytes=one_bytes * 3 // 2))
    cm = ContextManager(store=store)
    a, b = cm.add_chunk("A short note."), cm.add_chunk("A brief memo.")
    assert store.model.kv_bytes(b.token_count) == one_bytes  # the same length
    view = cm.compose_chunks([a.hash, b.hash])
    for call in (
        lambda: cm.move_chunks([a.hash, b.hash], "cpu"),
        lambda: cm.move_to_cpu(view.hash),
    ):
        with pytest.raises(CapacityError, match="the KV of 2 chunks .* does not fit"):
            call()
        assert [cm.get_chunk(c.hash).tier for c in (a, b)] == ["gpu", "gpu"]
    assert [c.tier for c in cm.move_chunks([a.hash, b.hash], "disk")] == ["disk", "disk"]


def test_disk_budget_is_a_clear_error_and_leaves_no_partial_file(make_store):
    store = make_store(budgets=TierBudgets(disk_bytes=1))
    cm = ContextManager(store=store)
    with pytest.raises(CapacityError, match="disk tier is full"):
        cm.add_chunk(DOC)
    files = [p for p in (store.home / "kv").rglob("*") if p.is_file() and p.name != ".lock"]
    assert cm.list_chunks() == [] and not files


def test_prefetch_brings_provenance_neighbours_before_use(make_store):
    store = make_store()
    cm = ContextManager(store=store)
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    g = cm.generate("Where is the vault?", GREEDY)
    cm.clear()
    for c in (doc, g.prompt_chunk, g.output_chunk):
        cm.archive_to_disk(c.hash)
    cm.activate_chunk(doc.hash)  # its children, the prompt and the answer, are prefetched
    store.wait_for_transfers()
    assert cm.get_chunk(g.prompt_chunk.hash).tier == "gpu"
    assert cm.get_chunk(g.output_chunk.hash).tier == "gpu"
    assert store.stats["prefetched"] >= 2
    misses, prefetch_hits = store.stats["pool_misses"], store.stats["prefetch_hits"]
    cm.activate_chunk(g.prompt_chunk.hash)
    cm.activate_chunk(g.output_chunk.hash)
    hits = store.stats["pool_hits"]
    cm.generate("And its code?", GREEDY)
    assert store.stats["pool_misses"] == misses and store.stats["pool_hits"] > hits
    # Each prefetched chunk counts as a hit at its first use only: doc, prompt and answer.
    assert store.stats["prefetch_hits"] == prefetch_hits + 3
    cm.generate("And its colour?", GREEDY)
    assert store.stats["prefetch_hits"] == prefetch_hits + 3
    assert not store.tiers.pins.counts  # no generation runs: no entry left, not even at zero


def test_a_move_out_is_not_undone_by_a_prefetch_asked_for_before_it(make_store):
    """Transfers run one at a time in the background: a prefetch (or an activation's) still
    queued when the user moves the chunk out leaves it where the user put it; one asked for
    after the move brings it in."""
    store = make_store()
    cm = ContextManager(store=store)
    doc = cm.add_chunk(DOC)
    cm.archive_to_disk(doc.hash)
    for ask, move, tier in (
        (lambda: cm.prefetch(doc.hash), cm.archive_to_disk, "disk"),
        (lambda: cm.activate_chunk(doc.hash), cm.move_to_cpu, "cpu"),
    ):
        gate = threading.Event()
        store.prefetcher.after_transfers(gate.wait)  # holds the queue
        ask()
        move(doc.hash)
        gate.set()
        store.wait_for_transfers()
        assert cm.get_chunk(doc.hash).tier == tier
    cm.prefetch(doc.hash)  # asked for after the move
    store.wait_for_transfers()
    assert cm.get_chunk(doc.hash).tier == "gpu"


def test_coactivation_prefetches_chunks_often_active_together(make_store):
    store = make_store(prefetch_policy="coactivation")
    cm = ContextManager(store=store)
    doc, often, once = (cm.add_chunk(f"{DOC} Note {i}.") for i in range(3))
    for partner in (often, often, once):
        cm.activate_chunk(partner.hash)
        cm.activate_chunk(doc.hash)
        cm.activate_chunk(doc.hash)  # already active: not active together once more
        cm.clear()
    store.wait_for_transfers()
    for c in (often, once):
        cm.archive_to_disk(c.hash)
    prefetched = store.stats["prefetched"]
    cm.activate_chunk(doc.hash)  # active together twice with `often`, once with `once`
    store.wait_for_transfers()
    assert cm.get_chunk(often.hash).tier == "gpu" and cm.get_chunk(once.hash).tier == "disk"
    assert store.stats["prefetched"] == prefetched + 1


def test_background_transfers_and_generation_do_not_disturb_each_other(make_store, monkeypatch):
    store = make_store(prefetch_policy="explicit")
    cm = ContextManager(store=store)
    docs = [cm.add_chunk(f"{DOC} Copy {i}. " * 20) for i in range(6)]
    cm.activate_chunk(docs[0].hash)
    expected = cm.generate("What is the code?", GREEDY).text
    originals = {d.hash: kv_of(cm, d.hash) for d in docs}
    later = docs[1:]
    for d in later:
        cm.archive_to_disk(d.hash)
    started, release, reads = gate_file_reads(monkeypatch, [d.hash for d in later])
    for d in later:
        cm.prefetch(d.hash)
    assert started[later[0].hash].wait(60)  # the prefetches are under way before it starts
    landed_mid_generation: list[bool] = []

    def after_first_token(_text: str) -> None:
        # Let the prefetches finish now: their KV lands in the pool between this
        # generation's steps, and its remaining tokens are computed after that.
        if not landed_mid_generation:
            for event in release.values():
                event.set()
            store.wait_for_transfers()
            landed_mid_generation.append(all(d.hash in store.tiers.kv for d in later))

    answer = cm.generate("What is the code?", GREEDY, on_text=after_first_token)
    assert landed_mid_generation == [True] and answer.text == expected
    assert len(answer.token_ids) > 1 and reads == {d.hash: 1 for d in later}
    assert cm.generate("What is the code?", GREEDY).text == expected
    for d in docs:
        k, v = kv_of(cm, d.hash)
        assert torch.equal(k, originals[d.hash][0]) and torch.equal(v, originals[d.hash][1])


def gate_file_reads(monkeypatch, hashes) -> tuple[dict, dict, Counter]:
    """Stall reads of these chunks' files until released: (started, release, reads)."""
    started = {h: threading.Event() for h in hashes}
    release = {h: threading.Event() for h in hashes}
    reads: Counter[str] = Counter()
    read = chunk_files.read_kv_file

    def gated(path, *args, **kwargs):
        chunk_hash = path.stem
        reads[chunk_hash] += 1
        if chunk_hash in release:
            started[chunk_hash].set()
            assert release[chunk_hash].wait(60)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(chunk_files, "read_kv_file", gated)
    return started, release, reads


def test_a_generation_waits_only_for_the_chunk_it_needs(make_store, monkeypatch):
    store = make_store(prefetch_policy="explicit")
    cm = ContextManager(store=store)
    needed = cm.add_chunk(DOC)
    other = cm.add_chunk("The lighthouse keeper owns three goats and a red boat.")
    cm.activate_chunk(needed.hash)
    expected = cm.generate("Where is the vault?", GREEDY).text
    for c in (needed, other):
        cm.archive_to_disk(c.hash)
    started, release, reads = gate_file_reads(monkeypatch, [needed.hash, other.hash])
    release[needed.hash].set()
    cm.prefetch(other.hash)
    assert started[other.hash].wait(60)
    # The prefetch of `other` is stuck in its read: a generation that needs only `needed`
    # does not wait for it.
    assert cm.generate("Where is the vault?", GREEDY).text == expected
    assert other.hash not in store.tiers.kv
    release[other.hash].set()
    store.wait_for_transfers()
    assert other.hash in store.tiers.kv and reads == {needed.hash: 1, other.hash: 1}

    # A generation that needs a chunk still being read waits for that read, not a second one.
    cm.archive_to_disk(needed.hash)
    started, release, reads = gate_file_reads(monkeypatch, [needed.hash])
    cm.prefetch(needed.hash)
    assert started[needed.hash].wait(60)
    misses, answers = store.stats["pool_misses"], []
    generation = threading.Thread(
        target=lambda: answers.append(cm.generate("Where is the vault?", GREEDY).text)
    )
    generation.start()
    deadline = time.monotonic() + 60
    while store.stats["pool_misses"] == misses:  # until it has asked for the chunk
        assert time.monotonic() < deadline and generation.is_alive()
        time.sleep(0.01)
    time.sleep(0.2)
    release[needed.hash].set()
    generation.join(60)
    assert answers == [expected] and reads == {needed.hash: 1}


def test_bf16_disk_compression_is_declared_and_honoured(make_store):
    store = make_store(budgets=TierBudgets(disk_compression="bf16"))
    cm = ContextManager(store=store)
    doc = cm.add_chunk(DOC)
    k0, v0 = kv_of(cm, doc.hash)
    cm.archive_to_disk(doc.hash)
    from kvchunks.store.kv_file import read_kv_header

    header = read_kv_header(kv_path(store.home, doc.hash))
    assert header.compression == "bf16" and header.dtype == "float32"
    k1, v1 = kv_of(cm, doc.hash)
    assert k1.dtype == torch.float32 and not torch.equal(k0, k1)
    # Exactly the bfloat16 round trip: nothing lost beyond the down-cast itself.
    assert torch.equal(k1, k0.bfloat16().float()) and torch.equal(v1, v0.bfloat16().float())


def test_a_generation_keeps_the_room_it_made(model_path, llm, home, monkeypatch):
    small = LLM(model_path, EngineConfig(num_blocks=8, block_size=16))
    small.runner.model = llm.runner.model  # same weights, a pool of 8 x 16 tokens
    store = ChunkStore(home=home, llm=small, prefetch_policy="explicit")
    cm = ContextManager(store=store)
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    expected = cm.generate("Where is the vault?", GREEDY).token_ids
    idle = [cm.add_chunk(f"Idle fact {i}: the {w} is blue.") for i, w in enumerate("pqrst")]
    run = generation._run

    def prefetched_first(*args):
        # What background prefetches may do between a request's admission and its first step:
        # fill every free block of the pool.
        for c in idle:
            with contextlib.suppress(CapacityError):
                store.move_to_gpu(store.registry.get(c.hash))
        assert small.block_manager.num_free == 0
        return run(*args)

    monkeypatch.setattr(generation, "_run", prefetched_first)
    assert cm.generate("Where is the vault?", GREEDY).token_ids == expected
    store.close()
    assert small.block_manager.num_free == 8


def test_a_chunk_deleted_elsewhere_while_it_is_archived_leaves_no_file(make_cm, monkeypatch):
    """Two stores on one data directory (a node's workers): one archives a chunk whose file
    it writes again, the other deletes the chunk meanwhile. No orphan file is left."""
    from kvchunks.common import ChunkNotFound

    cm, other = make_cm(), make_cm()
    doc = cm.add_chunk(DOC)
    cm.move_to_cpu(doc.hash)
    path = kv_path(cm.store.home, doc.hash)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # so that the archive writes the file again
    path.write_bytes(bytes(data))
    is_sound, deleting = cm.store.files.is_sound, []

    def checked_then_deleted(chunk):
        sound = is_sound(chunk)
        deleting.append(threading.Thread(target=other.delete_chunk, args=(doc.hash,)))
        deleting[0].start()
        deleting[0].join(2)  # the delete ends here, unless the archive holds the file
        return sound

    monkeypatch.setattr(cm.store.files, "is_sound", checked_then_deleted)
    with contextlib.suppress(ChunkNotFound):
        cm.archive_to_disk(doc.hash)
    deleting[0].join(60)
    assert cm.registry.missing([doc.hash]) and not path.exists()
