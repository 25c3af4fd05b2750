"""The service layer's parts on their own: no model, no Redis, no Ray cluster."""

from __future__ import annotations

import threading
import time
import types
from collections import Counter

import numpy as np
import pytest
import torch

from kvchunks.actors.host_store import HostStore
from kvchunks.actors.kv_transfer import KVPayload
from kvchunks.common import CapacityError
from kvchunks.policies.lru import LRUBudget
from kvchunks.service.chunk_files import ChunkFiles
from kvchunks.service.compose import leading_tokens, recorded_combination
from kvchunks.service.kv_sources import KVLoader
from kvchunks.service.pieces import cut, merged, owner_hashes, spans
from kvchunks.store.chunk import ChunkInfo, ChunkRecord, SourceSpan
from kvchunks.store.hashing import content_hash
from kvchunks.store.host_memory import HostMemory
from kvchunks.vocabulary import farthest_tier, nearest_tier

A, B = "a" * 64, "b" * 64
SHAPE = (2, None, 1, 4)  # layers, tokens, kv heads, head dim


def chunk(tokens: int, chunk_hash: str = A, **fields) -> ChunkInfo:
    ids = list(range(tokens))
    return ChunkInfo(hash=chunk_hash, content_hash=content_hash(ids), token_ids=ids, **fields)


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, tokens, 1, 4, generator=g) for _ in range(2))  # type: ignore[return-value]


def test_spans_cut_and_merge_lay_out_views():
    view = chunk(5, B, layout="view", sources=[SourceSpan(A, 2, 3), SourceSpan(A, 0, 2)])
    assert spans(chunk(4)) == [SourceSpan(A, 0, 4)]
    assert owner_hashes(view) == [A]
    assert cut(view.sources, 1, 4) == [SourceSpan(A, 3, 2), SourceSpan(A, 0, 1)]
    assert merged([(A, 0, 2), (A, 2, 5), (B, 0, 1), (A, 5, 6)]) == [
        (A, 0, 5),
        (B, 0, 1),
        (A, 5, 6),
    ]


def test_tier_order():
    assert farthest_tier(["gpu", "disk", "cpu"]) == "disk"
    assert nearest_tier(["disk", "cpu"]) == "cpu"


def test_leading_tokens_share_the_budget_evenly_from_each_chunk_start():
    assert leading_tokens([4, 4], 4) == [0, 1, 4, 5]
    assert leading_tokens([1, 6], 5) == [0, 1, 2, 3, 4]  # the short chunk gives up its share
    assert leading_tokens([3], 10) == [0, 1, 2]
    assert leading_tokens([3, 3], 0) == []


def test_recorded_combination_reads_old_and_new_records():
    assert recorded_combination(chunk(1, metadata={"combine": "realign:0.3"})) == ("realign", 0.3)
    assert recorded_combination(chunk(1, metadata={"combine": ""})) == ("reuse", None)
    assert recorded_combination(chunk(1, metadata={"mode": "exact"})) == ("exact", None)


class SlowSource:
    name = "slow"

    def __init__(self, result, delay: float = 0.2):
        self.result, self.delay, self.calls = result, delay, Counter()

    def load(self, chunk: ChunkInfo):
        self.calls[chunk.hash] += 1
        time.sleep(self.delay)
        return self.result


def test_loader_asks_sources_in_order_and_loads_each_chunk_once_at_a_time():
    empty, full = SlowSource(None, 0), SlowSource(kv(3))
    stats: Counter[str] = Counter()
    loader = KVLoader([empty, full], stats)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(loader.load(chunk(3)))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert full.calls[A] == 1 and empty.calls[A] == 1  # the other three waited for that load
    assert stats["load_waits"] == 3
    assert all(r is full.result for r in results)
    assert loader.load(chunk(3)) is full.result and full.calls[A] == 2  # nothing is cached


def test_a_kept_load_stays_on_offer_until_it_is_released():
    source = SlowSource(kv(3), 0)
    loader = KVLoader([source], Counter())
    kept = loader.load(chunk(3), keep=True)  # a prefetch, not yet in the pool
    assert loader.load(chunk(3)) is kept and source.calls[A] == 1  # a generation meanwhile
    loader.release(A)
    assert loader.load(chunk(3)) is kept and source.calls[A] == 2


def test_loader_returns_none_when_no_source_has_it():
    assert KVLoader([SlowSource(None, 0)], Counter()).load(chunk(3)) is None


def make_files(tmp_path, stats: Counter, budget: int | None = None, admit=None) -> ChunkFiles:
    host = HostMemory(1 << 20)
    return ChunkFiles(tmp_path, "f" * 64, "float32", SHAPE, host, stats, budget, "none", admit)


def test_chunk_files_round_trip_bitwise_and_refuse_damage(tmp_path):
    stats: Counter[str] = Counter()
    files = make_files(tmp_path, stats)
    k, v = kv(3)
    files.write(chunk(3), k, v)
    loaded = files.load(chunk(3))
    assert loaded is not None and torch.equal(loaded[0], k) and torch.equal(loaded[1], v)
    assert stats["file_loads"] == 1
    data = bytearray(files.path(A).read_bytes())
    data[-10] ^= 0xFF
    files.path(A).write_bytes(bytes(data))
    assert files.load(chunk(3)) is None and stats["bad_files"] == 1
    files.remove(A)
    assert not files.exists(A) and files.load(chunk(3)) is None


def test_chunk_files_keep_the_disk_budget(tmp_path):
    files = make_files(tmp_path, Counter(), budget=4096)
    files.write(chunk(3), *kv(3))
    used = files.used_bytes()
    with pytest.raises(CapacityError, match="disk tier is full"):
        files.write(chunk(100, B), *kv(100))
    assert files.used_bytes() == used and not files.exists(B)


def test_a_chunk_files_own_file_only_is_its_kv(tmp_path):
    """Another chunk's sound file at this chunk's path counts as damaged: never its KV."""
    stats: Counter[str] = Counter()
    files = make_files(tmp_path, stats)
    files.write(chunk(3, A), *kv(3, seed=1))
    files.write(chunk(3, B), *kv(3, seed=2))
    files.path(B).write_bytes(files.path(A).read_bytes())
    assert files.load(chunk(3, B)) is None and stats["bad_files"] == 1
    assert files.load(chunk(3, A)) is not None


def test_the_disk_budget_counts_the_bytes_a_compressed_file_takes(tmp_path):
    host = HostMemory(1 << 20)
    k, v = kv(100)
    # Room for bfloat16 copies of k and v (a half each) and the header, not float32's.
    budget = k.nbytes + 2048
    files = ChunkFiles(tmp_path, "f" * 64, "float32", SHAPE, host, Counter(), budget, "bf16")
    files.write(chunk(100), k, v)
    assert 0 < files.used_bytes() <= budget


def payload(tokens: int, seed: int = 0) -> KVPayload:
    return KVPayload.from_tensors(*kv(tokens, seed))


def test_host_store_keeps_its_own_copy():
    store = HostStore()
    sent = payload(8, seed=1)
    store.put("x", sent)
    sent.k[:] = 0  # the sender's arrays may go away: the store kept its own
    assert not np.array_equal(store.get("x").k, sent.k)
    assert store.sizes() == {"x": sent.nbytes}
    assert store.drop("x") and store.get("x") is None and store.sizes() == {}


def test_lru_budget_names_the_coldest_chunks_to_drop_and_refuses_what_cannot_fit():
    budget = LRUBudget(300, sizes={"old": 100})
    assert budget.admit("x", 100) == [] and budget.admit("y", 100) == []
    budget.touch("old")  # now x is the coldest
    assert budget.admit("z", 150) == ["x", "y"] and set(budget.sizes) == {"old", "z"}
    assert budget.admit("z", 150) == [] and budget.used_bytes() == 250  # counted once
    budget.admit("old", 100)  # kept again: now the most recent, z the coldest
    assert budget.admit("w", 100) == ["z"]
    assert budget.admit("huge", 301) is None and "huge" not in budget.sizes
    assert budget.fits(100) and not budget.fits(101)
    assert budget.forget("old") and not budget.forget("old")
    assert LRUBudget(None).admit("any", 10**15) == []  # no limit


def test_files_ask_a_budget_kept_elsewhere_before_writing(tmp_path):
    asked = []

    def admit(chunk_hash: str, nbytes: int) -> bool:
        asked.append((chunk_hash, nbytes))
        return len(asked) == 1

    files = make_files(tmp_path, Counter(), budget=0, admit=admit)  # the budget kept elsewhere
    k, v = kv(3)
    files.write(chunk(3), k, v)
    with pytest.raises(CapacityError, match="disk tier of this node is full"):
        files.write(chunk(5, B), *kv(5))
    assert asked == [(A, k.nbytes + v.nbytes), (B, 2 * kv(5)[0].nbytes)]
    assert files.exists(A) and not files.exists(B)


def test_a_view_is_its_record_with_the_state_of_one_process_and_context():
    record = ChunkRecord(hash=A, content_hash=content_hash([1, 2]), token_ids=[1, 2], tags=["t"])
    view = ChunkInfo.view(record, "cpu", is_active=True)
    assert (view.tier, view.is_active, view.segments, view.tags) == ("cpu", True, [], ["t"])
    assert view.to_record() == record.to_record()  # the view's state is never kept
    assert ChunkRecord.from_record(view.to_record()) == record
    assert "tier" not in record.to_record() and "is_active" not in record.to_record()


def test_every_registry_write_goes_through_the_registry_actor():
    """A worker's RegistryClient sends WRITES to the one actor and makes READS on Redis
    itself: a public method in neither would write around the actor."""
    from kvchunks.actors.registry_actor import READS, WRITES, RegistryClient
    from kvchunks.store.registry import ChunkRegistry

    public = {name for name in dir(ChunkRegistry) if not name.startswith("_")}
    assert public == set(WRITES) | set(READS) and not set(WRITES) & set(READS)
    assert all(getattr(RegistryClient, name) is not getattr(ChunkRegistry, name) for name in WRITES)


def test_an_answer_stopped_before_it_started_never_runs():
    from kvchunks.actors.answer_stream import AnswerStreams
    from kvchunks.common import ListenerGone

    streams, ran = AnswerStreams(), []
    streams.stop("early")  # its caller went away while the call waited to start
    with pytest.raises(ListenerGone, match="before it started"):
        list(streams.stream("early", lambda on_text, check_stop: ran.append(on_text)))
    assert ran == [] and streams.running == {}
    answered = list(streams.stream("later", lambda on_text, _: (on_text("Hi"), "result")[1]))
    assert answered == ["Hi", "result"]


@pytest.mark.parametrize("keep", [False, True])
def test_a_running_answer_stopped_ends_at_its_next_text_keeping_its_part_if_asked(keep):
    """The answer's next on_text raises: KeyboardInterrupt, which a generation ends on keeping
    what was computed (the caller's Ctrl-C), or ListenerGone, which keeps nothing."""
    from kvchunks.actors.answer_stream import AnswerStreams
    from kvchunks.common import ListenerGone

    streams, seen, stopped = AnswerStreams(), [], threading.Event()

    def answer(on_text, check_stop) -> str:
        try:
            on_text("one")
            stopped.wait(timeout=30)
            on_text("two")
        except BaseException as e:
            seen.append(type(e))
            return "kept" if isinstance(e, KeyboardInterrupt) else "not kept"
        return "done"

    stream = streams.stream("a1", answer)
    assert next(stream) == "one"
    streams.stop("a1", keep=keep)
    streams.stop("a1")  # a second stop does not take a keep back
    stopped.set()
    assert list(stream) == ["kept" if keep else "not kept"]
    assert seen == [KeyboardInterrupt if keep else ListenerGone]
    assert streams.running == {}


@pytest.mark.parametrize("keep", [False, True])
def test_an_answer_stopped_before_its_first_text_ends_at_its_next_check(keep):
    """Before any text (a long prefill) the answer's check_stop raises once it is stopped;
    a Ctrl-C's KeyboardInterrupt found nothing to keep, and the caller is told so."""
    from kvchunks.actors.answer_stream import AnswerStreams
    from kvchunks.common import ListenerGone

    streams, started, stopped = AnswerStreams(), threading.Event(), threading.Event()

    def answer(on_text, check_stop) -> str:
        started.set()
        stopped.wait(timeout=30)
        check_stop()  # between two layers of the prompt's pass
        on_text("never sent")
        return "not stopped"

    stream, raised = streams.stream("a2", answer), []
    reading = threading.Thread(
        target=lambda: raised.append(pytest.raises(ListenerGone, next, stream))
    )
    reading.start()
    assert started.wait(timeout=30)
    streams.stop("a2", keep=keep)
    stopped.set()
    reading.join(timeout=30)
    message = "before its answer" if keep else "its caller went away"
    assert message in str(raised[0].value)
    assert streams.running == {}


def test_a_pool_report_that_fails_leaves_the_calls_outcome_its_own(caplog):
    """The report after a call goes to the registry actor, which may be restarting: the call
    (committed, or failed for its own reason) is not made to fail with the report's error."""
    import contextlib
    from types import SimpleNamespace

    from kvchunks.actors.worker import InferenceWorker
    from kvchunks.common import ServiceUnavailable

    def restarting() -> None:
        raise ServiceUnavailable("the registry actor is restarting")

    worker = object.__new__(InferenceWorker)  # a plain class: its collaborators set by hand
    worker.name, worker.lock, worker.deleted_lock, worker.deleted = (
        "w0",
        threading.Lock(),
        threading.Lock(),
        set(),
    )
    worker.store = SimpleNamespace(registry=SimpleNamespace(missing=lambda hashes: []))
    worker.shared = SimpleNamespace(serving=lambda context: contextlib.nullcontext())
    worker.report = SimpleNamespace(send=restarting)
    with worker._serving():
        pass  # a call that succeeded
    with pytest.raises(KeyError, match="its own"), worker._serving():
        raise KeyError("its own")
    assert caplog.text.count("could not report its pool") == 2


def test_every_kvchunks_error_is_a_public_name():
    import kvchunks
    from kvchunks import common

    errors = {
        name
        for name, value in vars(common).items()
        if isinstance(value, type) and issubclass(value, common.KVChunksError)
    }
    errors.remove("ListenerGone")  # ends an answer whose caller has gone: no caller sees it
    assert errors <= set(kvchunks.__all__)
    assert all(getattr(kvchunks, name) is getattr(common, name) for name in errors)


# Ray Serve's own configuration models warn on import (pydantic 2 deprecations, not ours).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_stopping_the_http_app_leaves_the_other_serve_applications(monkeypatch):
    """`kvchunks stop` deletes its own Serve application only, and stops Serve only when
    nothing else runs on it (Ray's Serve calls stand in here; tests/test_ray_cluster.py
    runs the app for real)."""
    from ray import serve

    from kvchunks.server.ray_serve import APP_NAME, undeploy

    calls: list = []
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(("delete", name)))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))
    for running, called in (
        ({APP_NAME: 1, "other": 1}, [("delete", APP_NAME)]),
        ({"other": 1}, []),
        ({APP_NAME: 1}, [("delete", APP_NAME), "shutdown"]),
    ):
        calls.clear()
        status = types.SimpleNamespace(applications=running)
        monkeypatch.setattr(serve, "status", lambda status=status: status)
        assert undeploy() == (APP_NAME in running) and calls == called
