"""The registry's Redis dies under a ContextManager: every call fails with RegistryUnavailable
(one line), the process keeps nothing half done (pool blocks, resident KV), and once the
server is back (the same server, restarted on its AOF) the records, the context and the chunk
files are exactly as before the failed calls."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ports import free_port
from test_store_redis_url import StandaloneRedis

from kvchunks.common import RegistryUnavailable
from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager

GREEDY = SamplingParams(temperature=0, max_tokens=8)
DOC_A = "The lighthouse keeper of Varden Isle is Oskar Lind."
DOC_B = "The ferry leaves Brekke harbour at nine and at four."


@pytest.fixture
def server(tmp_path) -> Iterator[StandaloneRedis]:
    (tmp_path / "redis").mkdir()
    server = StandaloneRedis(tmp_path / "redis", free_port())
    server.start()
    yield server
    if server.process.poll() is None:
        server.process.terminate()
        server.process.wait()


@pytest.fixture
def cm(model_path, llm, server, home) -> Iterator[ContextManager]:
    """A context over the server with two documents (one active), a question and its answer,
    and a view; every tier record written. Its engine has a pool of its own (the session's
    weights), so that blocks a failed call keeps cannot leak into other tests."""
    engine = LLM(model_path, EngineConfig(kv_cache_bytes=64 << 20))
    engine.runner.model = llm.runner.model
    store = ChunkStore(home=home, llm=engine, redis_url=server.url)
    try:
        cm = ContextManager(store=store)
        a, b = cm.add_chunk(DOC_A), cm.add_chunk(DOC_B)
        cm.activate_chunk(a.hash)
        cm.generate("Who keeps the lighthouse?", GREEDY)
        cm.compose_chunks([a.hash, b.hash])
        store.wait_for_transfers()
        store.tiers.records.flush()
        yield cm
    finally:
        store.close()


def recorded(cm: ContextManager) -> tuple:
    """What the registry and the disk say: records, the context, its settings, the KV files.
    (Tiers are left out: they say where this process holds the KV, checked by `held`.)"""
    chunks = [
        (c.hash, c.token_ids, c.kind, c.tags, c.is_active, c.ref_count, c.parent_chunks)
        for c in cm.list_chunks()
    ]
    files = sorted(p.name for p in (cm.store.home / "kv").rglob("*.safetensors"))
    return chunks, [c.hash for c in cm.context().chunks], cm.settings, files


def held(cm: ContextManager) -> tuple:
    """What this process holds: free pool blocks, KV in the pool and in host memory."""
    store = cm.store
    return store.model.llm.block_manager.num_free, sorted(store.tiers.kv), sorted(store.host.kv)


def refused(call) -> None:
    with pytest.raises(RegistryUnavailable) as info:
        call()
    assert "\n" not in str(info.value)


def test_every_call_while_redis_is_down_is_refused_and_changes_nothing(cm, server):
    a, b = (cm.list_chunks(pattern=text[:20])[0].hash for text in (DOC_A, DOC_B))
    answer = cm.last_generation.token_ids
    before, holding = recorded(cm), held(cm)
    server.kill()
    calls = {
        "add_chunk": lambda: cm.add_chunk("A document that was never stored."),
        "activate_chunk": lambda: cm.activate_chunk(b),
        "deactivate_chunk": lambda: cm.deactivate_chunk(a),
        "generate": lambda: cm.generate("Where does the ferry leave from?", GREEDY),
        "compose_chunks": lambda: cm.compose_chunks([b, a]),
        "split_chunk": lambda: cm.split_chunk(a, 4),
        "delete_chunk": lambda: cm.delete_chunk(b, cascade=True),
        "move_to_cpu": lambda: cm.move_to_cpu(a),
        "archive_to_disk": lambda: cm.archive_to_disk(a),
        "tag_chunk": lambda: cm.tag_chunk(a, "isle"),
        "configure": lambda: cm.configure(mode="exact"),
        "list_chunks": lambda: cm.list_chunks(),
    }
    for name, call in calls.items():
        refused(call)
        assert held(cm) == holding, name
    server.start()  # the same client reconnects
    assert recorded(cm) == before
    assert cm.generate("Who keeps the lighthouse?", GREEDY).token_ids == answer


def test_redis_dying_during_a_generation_leaves_no_half_made_answer(cm, server):
    before, holding = recorded(cm), held(cm)
    tokens: list[str] = []

    def kill_at_first_token(text: str) -> None:
        if not tokens:
            server.kill()  # the answer is being computed; its chunks are not stored yet
        tokens.append(text)

    refused(
        lambda: cm.generate("Where does the ferry leave from?", GREEDY, on_text=kill_at_first_token)
    )
    assert tokens and held(cm) == holding
    server.start()
    assert recorded(cm) == before
