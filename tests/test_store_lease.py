"""Leases: the holds of a process killed mid-call are let go by a store still alive, and a
live process's holds are not, however long its call runs."""

import signal
import subprocess
import sys
import threading
import time

import pytest

from kvchunks.common import RegistryUnavailable
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
from kvchunks.service.lease import StoreLease

# A process on the test's registry whose one call holds a chunk and never ends: a store's
# lease and a call's hold, without a model.
HOLDING_PROCESS = """
import sys, time
from pathlib import Path
from kvchunks.service.lease import StoreLease
from kvchunks.store.redis_server import connect
from kvchunks.store.registry import ChunkRegistry

home, name, chunk = sys.argv[1:]
registry = ChunkRegistry(connect(Path(home)))
StoreLease(registry, name, on_renew=lambda: None, seconds=1.0)
registry.hold(f"{name}:call", [chunk])
print("holding", flush=True)
time.sleep(600)
"""


# A process whose chat is killed at its first token: the conversation's earlier messages are
# stored by then (made, not yet stored as the call's own); its prompt and answer are not.
KILLED_MID_CHAT = """
import os, signal, sys
from pathlib import Path
import kvchunks.service.lease
kvchunks.service.lease.LEASE_SECONDS = 1.0
from kvchunks.engine import SamplingParams
from kvchunks.service.context_manager import ContextManager

model, home, document = sys.argv[1:]
cm = ContextManager(model, home=Path(home), context="killed")
cm.activate_chunk(document)
messages = [
    {"role": "user", "content": "Which lighthouse is white?"},
    {"role": "assistant", "content": "The one on skerry 1."},
    {"role": "user", "content": "And the other one?"},
]
params = SamplingParams(temperature=0, max_tokens=8)
cm.chat(messages, params, on_text=lambda _: os.kill(os.getpid(), signal.SIGKILL))
"""


def _start_holding(home, name: str, chunk_hash: str) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLDING_PROCESS, str(home), name, chunk_hash]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    return process


def _wait_until_lapsed(registry, name: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while name not in registry.lapsed_stores():
        assert time.monotonic() < deadline, f"the lease of {name} did not lapse"
        time.sleep(0.1)


def test_a_killed_process_holds_go_and_a_live_ones_stay(make_store, home):
    store = make_store()
    cm = ContextManager(store=store)
    dead_ones, live_ones = (cm.add_chunk(f"The lighthouse on skerry {i} is white.") for i in (1, 2))
    registry = store.registry
    killed = _start_holding(home, "killed", dead_ones.hash)
    alive = _start_holding(home, "alive", live_ones.hash)
    try:
        for chunk in (dead_ones, live_ones):
            assert not registry.take_back(chunk.hash)  # held: marked, to go with the last hold
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        _wait_until_lapsed(registry, "killed")
        time.sleep(1.5)  # past a lease of the live process: its renewals keep it
        assert registry.lapsed_stores() == ["killed"]
        store.maker.let_go_of_lapsed_stores()
        assert not registry.exists(dead_ones.hash)
        assert store.files.exists(live_ones.hash) and not store.files.exists(dead_ones.hash)
        assert registry.exists(live_ones.hash)
        assert registry.holds_of(["alive"]) == [("alive:call", live_ones.hash)]
        assert registry.lapsed_stores() == []  # the killed one is forgotten once let go of
    finally:
        alive.kill()
        alive.wait()
    _wait_until_lapsed(registry, "alive")
    store.maker.let_go_of_lapsed_stores()
    assert registry.held() == [] and not registry.exists(live_ones.hash)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _round(lease: StoreLease, clock: Clock, at: float) -> None:
    clock.now = at
    lease.renew()
    if lease.sweep is not None:
        lease.sweep.join()


def test_a_store_lets_go_of_others_only_after_a_whole_lease_of_its_own(make_store):
    """After a gap in its own lease (the registry was away: every lease ran out), a store
    waits a whole lease, in which every live store renews its own, before it lets go of
    what stores without a lease held."""
    registry = make_store().registry
    clock, sweeps = Clock(), []
    # A long lease: its own thread's first round comes after the test.
    lease = StoreLease(registry, "renewing", lambda: sweeps.append(clock.now), 30, clock)
    for at in (10, 20, 30, 40):
        _round(lease, clock, at)
    assert sweeps == [30, 40]
    registry.end_lease("renewing")  # as if it had run out
    for at in (50, 60, 70, 80):
        _round(lease, clock, at)
    assert sweeps == [30, 40, 80]  # renewed at 50 after the gap: held a whole lease at 80
    assert registry.lapsed_stores() == []
    lease.close()
    registry.hold("renewing:call", [])  # no chunk: the store is one that holds all the same
    assert registry.lapsed_stores() == ["renewing"]  # closed: ended at once, not at its expiry


def test_what_a_killed_call_made_and_had_not_stored_is_taken_back(make_store, home, model_path):
    """As a call that fails leaves nothing: the messages its chat had computed go once its
    process's lease lapses, while the document it read (stored before, found) stays."""
    store = make_store()
    cm = ContextManager(store=store)
    document = cm.add_chunk("The lighthouse on skerry 1 is white; the one on skerry 2 is red.")
    before = {c.hash for c in cm.list_chunks()}
    args = [sys.executable, "-c", KILLED_MID_CHAT, str(model_path), str(home), document.hash]
    died = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr
    registry = store.registry
    made = {c.hash for c in cm.list_chunks()} - before
    assert {c.role for c in registry.get_many(made)} == {"user", "assistant"}  # the messages
    assert set(registry.held()) >= {document.hash, *made}  # and the prompt, not yet stored
    deadline = time.monotonic() + 10
    while not registry.lapsed_stores():
        assert time.monotonic() < deadline, "the killed process's lease did not lapse"
        time.sleep(0.1)
    store.maker.let_go_of_lapsed_stores()
    assert {c.hash for c in cm.list_chunks()} == before and registry.held() == []
    assert all(not store.files.exists(h) for h in made) and store.files.exists(document.hash)


def test_a_store_that_fails_to_start_leaves_no_lease_blocks_or_threads(
    make_store, llm, home, monkeypatch
):
    """On an engine already started, a store's start (the opening's KV, the tiers brought
    back) runs in its constructor; when it fails, nothing of the store stays behind."""
    registry = make_store().registry
    free_blocks, threads = llm.block_manager.num_free, set(threading.enumerate())

    def registry_gone(store):
        raise RegistryUnavailable("the registry went away")

    monkeypatch.setattr(ChunkStore, "restore_tiers", registry_gone)
    with pytest.raises(RegistryUnavailable):
        ChunkStore(home=home, llm=llm, holder_name="never-made")
    assert llm.block_manager.num_free == free_blocks  # its opening's KV given back
    assert {t for t in threading.enumerate() if t.is_alive()} <= threads
    registry.hold("never-made:call", [])
    assert registry.lapsed_stores() == ["never-made"]  # no lease was left renewing
    registry.let_go("never-made:call", [])
