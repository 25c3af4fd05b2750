"""Property-based: any sequence of API operations keeps the store's invariants."""

from __future__ import annotations

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
from kvchunks.store.kv_file import kv_path

TEXTS = [
    f"Fact {i}: the {w} is {c}."
    for i, (w, c) in enumerate(
        [("door", "red"), ("lamp", "blue"), ("boat", "green"), ("kite", "gold"), ("cup", "grey")]
    )
]


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
        assert self.store.violations() == []


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


def test_broken_invariants_are_reported(make_store):
    store = make_store(namespace="audit")
    cm = ContextManager(store=store)
    a, b = cm.add_chunk(TEXTS[0]), cm.add_chunk(TEXTS[1])
    cm.compose_chunks([a.hash, b.hash])
    cm.activate_chunk(a.hash)
    store.wait_for_transfers()
    assert store.violations() == []
    bm = store.llm.block_manager
    store.registry.add_ref(b.hash, 1)  # a reference that no view holds
    leaked = bm.allocate(1)  # a block that no chunk owns
    store.evict(a.hash)
    store.host.pop(a.hash)
    kv_path(store.home, a.hash).unlink()  # an active chunk whose KV is nowhere
    try:
        found = store.violations()
    finally:
        bm.release(leaked)
    assert len(found) == 3, found
    assert f"chunk {b.hash[:12]}: ref_count 2, but 1 view(s) read it" in found
    assert any(f"pool block {leaked[0]}: ref count 1, held by 0" in line for line in found)
    assert f"active chunk {a.hash[:12]}: KV of {a.hash[:12]} cannot be loaded" in found
