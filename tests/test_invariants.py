"""Property-based: any sequence of API operations keeps the store's invariants."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvchunks.actors.chunk_store import ChunkStore
from kvchunks.actors.context_manager import ContextManager
from kvchunks.common import KVChunksError
from kvchunks.engine import SamplingParams

TEXTS = [
    f"Fact {i}: the {w} is {c}."
    for i, (w, c) in enumerate(
        [("door", "red"), ("lamp", "blue"), ("boat", "green"), ("kite", "gold"), ("cup", "grey")]
    )
]


def check_invariants(cm: ContextManager) -> None:
    store, registry = cm.store, cm.registry
    chunks = {c.hash: c for c in registry.list_chunks()}
    # Reference counts are exactly the views that read a chunk.
    readers = Counter(p for c in chunks.values() if c.layout == "view" for p in c.parent_chunks)
    for h, c in chunks.items():
        assert c.ref_count == readers[h], (h[:8], c.ref_count, readers[h])
    # Every active chunk exists and its KV can be had.
    for name in registry.contexts():
        for h in registry.active(name):
            assert h in chunks
            assert sum(s.length for s in store.segments(chunks[h])) == chunks[h].token_count
    # No pool block is owned twice or leaked: refcounts are exactly the resident segments'.
    bm = store.llm.block_manager
    owned = Counter(b for segments in store.kv.values() for s in segments for b in s.blocks)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == owned[block], block
    assert set(bm.free_ids) == {b for b in range(bm.num_blocks) if not owned[b]}
    assert set(store.kv) <= set(chunks) and not set(store.kv) & set(store.host.kv)
    # Provenance has no dangling edge.
    for h in chunks:
        assert set(registry.parents(h)) <= set(chunks)
        assert set(registry.children(h)) <= set(chunks)


class StoreMachine(RuleBasedStateMachine):
    llm = None
    home = None

    def __init__(self):
        super().__init__()
        self.store = ChunkStore(home=self.home, llm=self.llm, namespace=f"p{id(self)}")
        self.cm = ContextManager(store=self.store)
        self.known: list[str] = []

    def teardown(self):
        self.store.close()

    def pick(self, data) -> str:
        return data.draw(st.sampled_from(self.known))

    @rule(text=st.sampled_from(TEXTS))
    def add(self, text):
        self.known.append(self.cm.add_chunk(text).hash)

    @precondition(lambda self: self.known)
    @rule(data=st.data(), on=st.booleans())
    def toggle(self, data, on):
        h = self.pick(data)
        attempt(lambda: self.cm.activate_chunk(h) if on else self.cm.deactivate_chunk(h))

    @precondition(lambda self: len(self.known) >= 2)
    @rule(data=st.data())
    def compose(self, data):
        a, b = self.pick(data), self.pick(data)
        view = attempt(lambda: self.cm.compose_chunks([a, b]))
        if view:
            self.known.append(view.hash)

    @precondition(lambda self: self.known)
    @rule(data=st.data(), at=st.integers(1, 8))
    def split(self, data, at):
        h = self.pick(data)
        halves = attempt(lambda: self.cm.split_chunk(h, at))
        if halves:
            self.known += [c.hash for c in halves]

    @precondition(lambda self: self.known)
    @rule(data=st.data(), cascade=st.booleans())
    def delete(self, data, cascade):
        h = self.pick(data)
        gone = attempt(lambda: self.cm.delete_chunk(h, cascade=cascade)) or []
        self.known = [k for k in self.known if k not in gone]

    @precondition(lambda self: self.known)
    @rule(data=st.data(), tier=st.sampled_from(["gpu", "cpu", "disk"]))
    def move(self, data, tier):
        h = self.pick(data)
        moves = {
            "gpu": self.cm.move_to_gpu,
            "cpu": self.cm.move_to_cpu,
            "disk": self.cm.archive_to_disk,
        }
        attempt(lambda: moves[tier](h))

    @rule()
    def generate(self):
        attempt(
            lambda: self.cm.generate("Which is red?", SamplingParams(temperature=0, max_tokens=3))
        )

    @invariant()
    def holds(self):
        self.store.wait_for_transfers()
        check_invariants(self.cm)


def attempt(call):
    """Documented refusals are fine; anything else fails the test."""
    try:
        return call()
    except KVChunksError:
        return None


def test_operation_sequences_keep_invariants(llm, tmp_path):
    StoreMachine.llm, StoreMachine.home = llm, tmp_path
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=8,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
