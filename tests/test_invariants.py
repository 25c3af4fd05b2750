"""Property-based: any sequence of API operations keeps the store's invariants.

Each rule allows only the refusals its arguments can cause (typed), and a refused call must
leave everything a user or the pool can see as it was. The machine keeps its own model of
which chunks exist and which are active, checked against list_chunks and the context after
every step.
"""

from __future__ import annotations

import dataclasses
import itertools
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

from kvchunks.common import ChunkInUse, ChunkNotFound, InvalidInput
from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
from kvchunks.store.chunk import pack_record
from kvchunks.store.kv_file import kv_path
from kvchunks.store.redis_server import close, connect

TEXTS = [
    f"Fact {i}: the {w} is {c}."
    for i, (w, c) in enumerate(
        [("door", "red"), ("lamp", "blue"), ("boat", "green"), ("kite", "gold"), ("cup", "grey")]
    )
]
MODES = ["reuse", "exact", "realign"]
ANSWER = SamplingParams(temperature=0, max_tokens=3)
# Refusals seen over the whole run, by type: each rule's must actually happen.
REFUSED: Counter[str] = Counter()
_NAMESPACES = itertools.count()


class StoreMachine(RuleBasedStateMachine):
    llm = None
    home = None

    def __init__(self):
        super().__init__()
        namespace = f"invariants-{next(_NAMESPACES)}"
        self.store = ChunkStore(home=self.home, llm=self.llm, namespace=namespace)
        self.cm = ContextManager(store=self.store)
        self.known: set[str] = set()  # every chunk that exists
        self.active: list[str] = []  # the context's active chunks, in order
        self.deleted: set[str] = set()
        self.views: dict[str, list[str]] = {}  # view -> the chunks it reads

    def teardown(self):
        self.store.close()

    def pick(self, data, among) -> str:
        return data.draw(st.sampled_from(sorted(among)))

    def observed(self) -> tuple:
        """Everything a refused call must leave as it was."""
        self.store.wait_for_transfers()
        pool = (
            self.store.model.llm.block_manager.num_free,
            sorted(self.store.tiers.kv),
            sorted(self.store.host.kv),
        )
        files = sorted(h for h in self.known | self.deleted if kv_path(self.home, h).exists())
        return self.cm.list_chunks(), self.cm.context(), pool, files

    def refusable(self, call, *expected: type[Exception]):
        """The call's result; None if refused with one of `expected`, having changed nothing."""
        before = self.observed()
        try:
            return call()
        except expected as e:
            REFUSED[type(e).__name__] += 1
            assert self.observed() == before, f"refused with {e!r}, but state changed"
            return None

    @rule(text=st.sampled_from(TEXTS))
    def add(self, text):
        self.known.add(self.cm.add_chunk(text).hash)

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def activate(self, data):
        h = self.pick(data, self.known)
        self.cm.activate_chunk(h)
        if h not in self.active:
            self.active.append(h)

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def deactivate(self, data):
        h = self.pick(data, self.known)
        self.cm.deactivate_chunk(h)
        if h in self.active:
            self.active.remove(h)

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def compose(self, data):
        parts = [self.pick(data, self.known), self.pick(data, self.known)]
        self.made(self.cm.compose_chunks(parts))

    @precondition(lambda self: self.known)
    @rule(data=st.data(), at=st.integers(0, 40))
    def split(self, data, at):
        h = self.pick(data, self.known)
        halves = self.refusable(lambda: self.cm.split_chunk(h, at), InvalidInput)
        assert (halves is None) == (not 0 < at < self.cm.get_chunk(h).token_count)
        for half in halves or []:
            self.made(half)

    def made(self, view) -> None:
        self.known.add(view.hash)
        self.views[view.hash] = view.parent_chunks

    @precondition(lambda self: self.known)
    @rule(data=st.data(), cascade=st.booleans())
    def delete(self, data, cascade):
        h = self.pick(data, self.known)
        gone = self.refusable(lambda: self.cm.delete_chunk(h, cascade=cascade), ChunkInUse)
        read_by_views = any(h in sources for sources in self.views.values())
        assert (gone is None) == (read_by_views and not cascade)
        self.forget(gone or [])

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def delete_read_by_a_view(self, data):
        sources = {h for read in self.views.values() for h in read}
        h = self.pick(data, sources)
        assert self.refusable(lambda: self.cm.delete_chunk(h), ChunkInUse) is None

    def forget(self, gone: list[str]) -> None:
        self.known -= set(gone)
        self.deleted |= set(gone)
        self.active = [a for a in self.active if a not in gone]
        self.views = {v: read for v, read in self.views.items() if v not in gone}

    @precondition(lambda self: self.deleted - self.known)
    @rule(data=st.data(), op=st.sampled_from(["activate", "move", "split", "delete", "compose"]))
    def use_deleted(self, data, op):
        h = self.pick(data, self.deleted - self.known)
        calls = {
            "activate": lambda: self.cm.activate_chunk(h),
            "move": lambda: self.cm.move_to_cpu(h),
            "split": lambda: self.cm.split_chunk(h, 1),
            "delete": lambda: self.cm.delete_chunk(h, cascade=True),
            "compose": lambda: self.cm.compose_chunks([h, h]),
        }
        assert self.refusable(calls[op], ChunkNotFound) is None

    @precondition(lambda self: self.known)
    @rule(data=st.data(), tier=st.sampled_from(["gpu", "cpu", "disk"]))
    def move(self, data, tier):
        h = self.pick(data, self.known)
        moves = {
            "gpu": self.cm.move_to_gpu,
            "cpu": self.cm.move_to_cpu,
            "disk": self.cm.archive_to_disk,
        }
        assert moves[tier](h).tier == tier

    @rule(mode=st.sampled_from(MODES))
    def generate(self, mode):
        g = self.cm.generate("Which is red?", ANSWER, mode=mode)
        self.known |= {g.prompt_chunk.hash, *(c.hash for c in g.output_chunks)}

    @invariant()
    def holds(self):
        self.store.wait_for_transfers()
        assert self.store.violations() == []
        assert {c.hash for c in self.cm.list_chunks()} == self.known
        assert [c.hash for c in self.cm.context().chunks] == self.active


def test_operation_sequences_keep_invariants(tiny_checkpoint, tmp_path):
    # A small random model with 16-token blocks: chunks span blocks and end inside them, and
    # its steps cost little next to the store's, so the run can afford many examples.
    llm = LLM(tiny_checkpoint("llama"), EngineConfig(kv_cache_bytes=64 << 20, block_size=16))
    StoreMachine.llm, StoreMachine.home = llm, tmp_path
    REFUSED.clear()
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=20,
            deadline=None,
            # The same 30 runs every time: the refusals they must include are then always
            # there, and a failure shows again when run again.
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert set(REFUSED) == {"InvalidInput", "ChunkInUse", "ChunkNotFound"}, REFUSED
    assert llm.block_manager.num_free == llm.block_manager.num_blocks  # every store closed


def test_broken_invariants_are_reported(make_store):
    store = make_store(namespace="audit")
    cm = ContextManager(store=store)
    a, b = cm.add_chunk(TEXTS[0]), cm.add_chunk(TEXTS[1])
    cm.compose_chunks([a.hash, b.hash])
    cm.activate_chunk(a.hash)
    store.wait_for_transfers()
    assert store.violations() == []
    bm = store.model.llm.block_manager
    # A reference that no view holds, written as a crash between two writes could have
    # left it before views were counted in the view's own transaction.
    planted = dataclasses.replace(store.registry.get(b.hash), ref_count=2)
    client = connect(store.home)
    client.set(f"{store.registry.namespace}:chunk:{b.hash}", pack_record(planted.to_record()))
    close(client)
    leaked = bm.allocate(1)  # a block that no chunk owns
    store.tiers.evict(a.hash)
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
