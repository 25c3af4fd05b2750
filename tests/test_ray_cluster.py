"""The shared chunk pool with two CPU workers: shipping instead of recomputing, routing,
transfers that never wait behind calls, a worker killed mid-generation, a restarted registry
actor, KV lost with its owner, the tier stores, `kvchunks status`, and a start that fails
halfway."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest
import ray
import ray_fixtures
from click.testing import CliRunner
from ports import free_port

from kvchunks.actors.client import connect
from kvchunks.actors.remote import WorkerDied, get
from kvchunks.actors.router import Router
from kvchunks.cli.main import cli
from kvchunks.engine import SamplingParams
from kvchunks.store.kv_file import kv_path

ray_cluster, ray_service = ray_fixtures.ray_cluster, ray_fixtures.ray_service  # used by name

GREEDY = SamplingParams(temperature=0, max_tokens=16)
DOC = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in {*after, *before}}


def same_bits(a, b) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.k.tobytes() == b.k.tobytes()
        and (a.v.tobytes() == b.v.tobytes())
    )


def test_chunk_made_on_one_worker_is_shipped_to_another(ray_service, make_cm):
    s = ray_service
    before = s.stats("worker-1")
    doc = connect("auto", "ship-a", worker=0).add_chunk(DOC)
    on_b = connect("auto", "ship-b", worker=1)
    on_b.activate_chunk(doc.hash)
    answer = on_b.generate("Where is the vault?", GREEDY)
    moved = delta(s.stats("worker-1"), before)
    assert moved["shipped"] == 1 and moved.get("recomputes", 0) == 0
    assert moved.get("file_loads", 0) == 0
    a, b = (ray.get(s.worker(w).read_kv.remote(doc.hash)) for w in ("worker-0", "worker-1"))
    assert same_bits(a, b)
    assert get(s.service.registry.holders.remote(doc.hash)) == ["worker-0", "worker-1"]
    cm = make_cm("ship")  # the same, in this process
    cm.activate_chunk(cm.add_chunk(DOC).hash)
    local = cm.generate("Where is the vault?", GREEDY)
    assert answer.text == local.text and answer.output_chunk.hash == local.output_chunk.hash


def test_chunk_deleted_through_one_worker_leaves_the_other_pool(ray_service):
    s = ray_service
    doc = connect("auto", "gone-a", worker=0).add_chunk("A chunk that two workers hold.")
    on_b = connect("auto", "gone-b", worker=1)
    on_b.populate(doc.hash)  # shipped: worker-1 holds a copy
    assert get(s.service.registry.holders.remote(doc.hash)) == ["worker-0", "worker-1"]
    connect("auto", "gone-a", worker=0).delete_chunk(doc.hash)
    assert get(s.service.registry.holders.remote(doc.hash)) == []
    assert ray.get(s.worker("worker-1").violations.remote()) == []  # its copy is gone
    assert ray.get(s.worker("worker-1").read_kv.remote(doc.hash)) is None
    assert not kv_path(s.home, doc.hash).exists()


def test_router_sends_a_context_to_the_worker_holding_its_chunks(ray_service):
    s = ray_service
    doc = connect("auto", "route-src", worker=1).add_chunk("Ilse's bicycle is green.")
    client = connect("auto", "route")  # not pinned: the router decides
    client.activate_chunk(doc.hash)
    assert Router(s.service.registry).pick("route") == "worker-1"
    # A chunk's tier is where it is in the whole pool, whichever worker answers.
    assert connect("auto", "route", worker=0).get_chunk(doc.hash).tier == "gpu"
    before = {w: s.stats(w) for w in ("worker-0", "worker-1")}
    answer = client.generate("What colour is Ilse's bicycle?", GREEDY)
    assert get(s.service.registry.holders.remote(answer.prompt_chunk.hash)) == ["worker-1"]
    for w in before:
        assert delta(s.stats(w), before[w]).get("shipped", 0) == 0


@pytest.mark.parametrize("move", ["move_to_gpu", "move_chunks"])
def test_a_move_to_gpu_goes_to_the_worker_holding_the_chunk(ray_service, move):
    s = ray_service
    doc = connect("auto", f"{move}-src", worker=1).add_chunk(f"The {move} note is in the red box.")
    client = connect("auto", f"{move}-dst")  # not pinned: the router decides
    before = {w: s.stats(w) for w in ("worker-0", "worker-1")}
    moved = (
        client.move_to_gpu(doc.hash)
        if move == "move_to_gpu"
        else client.move_chunks([doc.hash], "gpu")[0]
    )
    assert moved.tier == "gpu"
    for w in before:
        assert delta(s.stats(w), before[w]).get("shipped", 0) == 0
    assert get(s.service.registry.holders.remote(doc.hash)) == ["worker-1"]


@pytest.mark.parametrize(("move", "tier"), [("move_to_cpu", "cpu"), ("archive_to_disk", "disk")])
def test_a_move_out_goes_to_the_worker_holding_the_chunk(ray_service, move, tier):
    s, context = ray_service, f"{move}-out"
    doc = connect("auto", f"{context}-src", worker=1).add_chunk(f"The {move} key is by the door.")
    on_0 = connect("auto", context, worker=0)
    on_0.activate_chunk(on_0.add_chunk(f"The {move} lamp is blue.").hash)
    client = connect("auto", context)  # routed: to worker-0, which holds its active chunk
    before = {w: s.stats(w) for w in ("worker-0", "worker-1")}
    assert getattr(client, move)(doc.hash[:10]).tier == tier  # not a copy made on worker-0
    for w in before:
        assert delta(s.stats(w), before[w]).get("shipped", 0) == 0
    assert "worker-1" not in get(s.service.registry.holders.remote(doc.hash))


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_activation_prefetches_on_the_worker_the_router_picks(ray_service):
    s = ray_service
    on_1 = connect("auto", "handover", worker=1)
    anchor = on_1.add_chunk("Ilse keeps her green bicycle in the shed behind the house.")
    docs = [
        on_1.add_chunk(f"The shed's key number {i} hangs under the third stone.") for i in (1, 2, 3)
    ]
    on_1.activate_chunk(anchor.hash)  # worker-1 holds the context's KV
    ray.get(s.worker("worker-1").evict.remote([d.hash for d in docs]))  # now only in files
    before = {w: s.stats(w) for w in ("worker-0", "worker-1")}
    # A routed client whose context last went to worker-0 activates there: no routing round
    # trip first, and the prefetch goes to worker-1, where the router sends the context.
    get(s.worker("worker-0").call.remote("handover", "activate_chunk", (docs[0].hash,)))
    wait_for(
        lambda: delta(s.stats("worker-1"), before["worker-1"]).get("prefetched", 0) == 1,
        "worker-1 never prefetched the chunk",
    )
    on_0 = delta(s.stats("worker-0"), before["worker-0"])
    assert on_0.get("prefetch_handed_over") == 1 and on_0.get("prefetched", 0) == 0
    # The context's next call on worker-0 tells the caller to move to worker-1, once.
    for moved_to in ("worker-1", None):
        call = s.worker("worker-0").call.remote("handover", "get_chunk", (docs[0].hash,))
        assert get(call)[1] == moved_to
    wait_for(  # worker-1 reports what it prefetched, with no call of its own to do it
        lambda: get(s.service.registry.holders.remote(docs[0].hash)) == ["worker-1"],
        "worker-1 never reported the chunk it prefetched",
    )
    assert Router(s.service.registry).pick("handover") == "worker-1"
    # A generation sent to worker-0 (by the router, say) supersedes a redirect not yet given.
    get(s.worker("worker-0").call.remote("handover", "activate_chunk", (docs[1].hash,)))
    wait_for(
        lambda: delta(s.stats("worker-0"), before["worker-0"])["prefetch_handed_over"] == 2,
        "worker-0 never handed the second prefetch over",
    )
    request = {"prompt": "Where is the key?", "params": GREEDY}
    stream = s.worker("worker-0").answer.remote("handover", "generate", request)
    assert [ray.get(ref) for ref in stream][-1].text
    call = s.worker("worker-0").call.remote("handover", "get_chunk", (docs[1].hash,))
    assert get(call)[1] is None
    # A client pinned to worker-0 has its activations prefetched there.
    connect("auto", "handover", worker=0).activate_chunk(docs[2].hash)
    assert ray.get(s.worker("worker-0").violations.remote()) == []  # waits for its transfers
    assert ray.get(s.worker("worker-0").read_kv.remote(docs[2].hash)) is not None
    assert delta(s.stats("worker-0"), before["worker-0"]).get("prefetch_handed_over") == 2


def test_a_routed_activation_with_its_kv_here_asks_no_tier_manager(ray_service):
    s = ray_service
    worker = s.worker("worker-1")
    on_1 = connect("auto", "view-here", worker=1)
    a, b, c, d = (on_1.add_chunk(f"Boat {i} is moored at pier {i}.") for i in range(4))
    on_1.activate_chunk(on_1.compose_chunks([a.hash, b.hash]).hash)  # pinned: no hand-over

    def planned() -> int:
        return get(s.service.tiers.transfers.remote()).get("prefetch_planned", 0)

    before = planned()
    # The pool holds the view's sources, not the view: its KV is here all the same.
    get(worker.call.remote("view-here", "activate_chunk", (c.hash,)))
    assert ray.get(worker.violations.remote()) == []  # waits for its transfers
    assert planned() == before
    ray.get(worker.evict.remote([a.hash]))  # a source only in its file: the manager plans
    get(worker.call.remote("view-here", "activate_chunk", (d.hash,)))
    assert ray.get(worker.violations.remote()) == []
    assert planned() == before + 1


def test_transfers_are_served_while_every_call_thread_waits(ray_service):
    """A peer's read_kv never queues behind calls waiting for this worker's lock: whoever
    holds the lock may be waiting for that peer."""
    worker = ray_service.worker("worker-0")
    doc = connect("auto", "threads", worker=0).add_chunk("The spare key is under the blue pot.")
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    request = {"prompt": "Tell a long story about the sea.", "params": params}
    answer = worker.answer.remote("threads", "generate", request)
    wait_for(lambda: ray.get(worker.status.remote())["busy"], "the generation never started")
    waiting = [worker.call.remote("threads-wait", "settings") for _ in range(8)]  # all threads
    assert ray.get(worker.read_kv.remote(doc.hash)) is not None
    assert ray.get(worker.ready.remote())
    assert ray.wait(waiting, timeout=0)[0] == []  # all still behind the generation
    assert [ray.get(ref) for ref in answer][-1].text
    get(waiting)


def test_a_ctrl_c_keeps_the_answer_as_in_process(ray_service):
    client = connect("auto", "interrupted", worker=0)
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    pieces: list[str] = []

    def interrupted(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    result = client.generate("Tell a long story about the sea.", params, on_text=interrupted)
    assert result.interrupted and result.output_chunk is not None
    kept = client.get_chunk(result.output_chunk.hash)
    assert 0 < kept.token_count < 1000 and kept.text.startswith(pieces[0].strip())
    assert kept.token_ids == result.token_ids and kept.text == result.text


def test_an_answer_nobody_reads_any_more_stops_on_the_worker(ray_service):
    """The caller's on_text fails (an HTTP client gone): the worker's answer stops at its
    next piece, frees the worker, and nothing of it is stored."""
    client = connect("auto", "stopped", worker=0)
    worker = ray_service.worker("worker-0")
    before = {c.hash for c in client.list_chunks()}
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    pieces: list[str] = []

    def gone(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise ConnectionResetError("the listener went away")

    with pytest.raises(ConnectionResetError):
        client.generate("Tell a long story about the sea.", params, on_text=gone)
    wait_for(lambda: not ray.get(worker.status.remote())["busy"], "the answer ran on", 20)
    assert {c.hash for c in client.list_chunks()} == before


@pytest.mark.parametrize("stop", [ConnectionResetError, KeyboardInterrupt])
def test_a_caller_that_stops_before_any_text_stops_the_workers_answer(ray_service, stop):
    """check_stop runs in the caller while it waits for the answer's first text (a long
    prefill): what it raises stops the worker's answer, and nothing of it is stored. A
    Ctrl-C there (KeyboardInterrupt) found nothing to keep, and goes on to the caller, as
    in process."""
    client = connect("auto", "stopped-early", worker=0)
    worker = ray_service.worker("worker-0")
    before = {c.hash for c in client.list_chunks()}
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    pieces: list[str] = []

    def gone() -> None:
        raise stop

    story = "Tell a long story about the sea. " * 40
    with pytest.raises(stop):
        client.generate(story, params, on_text=pieces.append, check_stop=gone)
    wait_for(lambda: not ray.get(worker.status.remote())["busy"], "the answer ran on", 20)
    assert pieces == [] and {c.hash for c in client.list_chunks()} == before
    if stop is KeyboardInterrupt:  # a check that never stops, without on_text, changes nothing
        short = SamplingParams(temperature=0, max_tokens=4)
        checked = client.generate("Say hello.", short, check_stop=lambda: None)
        assert checked.text == client.generate("Say hello.", short).text


def test_killed_worker_loses_no_chunk_and_answers_the_same(ray_service):
    s = ray_service
    client = connect("auto", "kill", worker=1)
    doc = client.add_chunk("Pelle the cat sleeps in the laundry basket every afternoon.")
    client.activate_chunk(doc.hash)
    first = client.generate("Where does Pelle sleep?", GREEDY)
    failures: list[Exception] = []

    def long_generation() -> None:
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        try:
            client.with_context("kill-long").generate("Tell a long story about the sea.", params)
        except WorkerDied as e:
            failures.append(e)

    thread = threading.Thread(target=long_generation)
    thread.start()
    deadline = time.monotonic() + 60
    while not ray.get(s.worker("worker-1").status.remote())["busy"]:
        assert time.monotonic() < deadline, "the long generation never started"
        time.sleep(0.05)
    time.sleep(1.0)  # well into the decode
    ray.kill(s.worker("worker-1"), no_restart=False)
    thread.join(60)
    assert len(failures) == 1 and "\n" not in str(failures[0])
    # Nothing acknowledged is lost: records in Redis, KV files on disk.
    listed = {c.hash for c in connect("auto", "kill-check", worker=0).list_chunks()}
    for chunk in (doc, first.prompt_chunk, first.output_chunk):
        assert chunk.hash in listed and kv_path(ray_service.home, chunk.hash).exists()
    again = client.generate("Where does Pelle sleep?", GREEDY)  # served by the restarted worker
    assert again.text == first.text and again.output_chunk.hash == first.output_chunk.hash
    assert s.stats("worker-1").get("recomputes", 0) == 0
    # The restarted worker let go of what the killed call held (its prompt, never stored).
    assert get(s.service.registry.call.remote("held")) == []


def test_kv_evicted_to_host_memory_outlives_its_worker(ray_service):
    s, service = ray_service, ray_service.service
    on_a = connect("auto", "host-a", worker=0)
    docs = [
        on_a.add_chunk("The tram to Oerlikon runs every 7 minutes from the main station."),
        on_a.add_chunk("The night tram to Oerlikon leaves at 00:45 from platform 3."),
    ]
    for doc in docs:
        on_a.activate_chunk(doc.hash)
    first = on_a.generate("When does the night tram leave?", GREEDY)
    made = [*docs, first.prompt_chunk, first.output_chunk]
    stored = {c.hash: ray.get(s.worker("worker-0").read_kv.remote(c.hash)) for c in made}
    for chunk in made:  # out of A's pool: into the node's host memory, not A's own
        assert on_a.move_to_cpu(chunk.hash).tier == "cpu"
    assert {c.hash for c in made} <= set(get(service.tiers.in_host.remote()))
    assert ray.get(s.worker("worker-0").status.remote())["host_chunks"] == 0
    ray.kill(s.worker("worker-0"), no_restart=False)  # Ray starts it again, with nothing held
    before, moves_before = s.stats("worker-1"), get(service.tiers.transfers.remote())
    on_b = connect("auto", "host-b", worker=1)
    for doc in docs:
        on_b.activate_chunk(doc.hash)
    again = on_b.generate("When does the night tram leave?", GREEDY)
    assert again.text == first.text and again.output_chunk.hash == first.output_chunk.hash
    on_b.populate(first.output_chunk.hash)  # stored already: the answer was not kept again
    moved = delta(s.stats("worker-1"), before)
    assert moved["shipped"] == len(made) and moved.get("recomputes", 0) == 0
    assert moved.get("file_loads", 0) == 0
    assert delta(get(service.tiers.transfers.remote()), moves_before)["from_host"] == len(made)
    for chunk_hash, kv in stored.items():
        assert same_bits(ray.get(s.worker("worker-1").read_kv.remote(chunk_hash)), kv)
    get(s.worker("worker-0").ready.remote(), "worker-0 restarting")  # for the tests after


def test_serve_with_http_answers_through_ray_serve(ray_service, make_cm):
    url = ray_service.http_url
    with httpx.Client(base_url=url, timeout=120) as http:
        doc = http.post("/v1/chunks", json={"text": DOC})
        assert doc.status_code == 201, doc.text
        http.post("/v1/contexts/serve-http/activate", json={"chunk": doc.json()["hash"]})
        assert http.get("/v1/contexts/serve-http").json()["chunks"][0]["hash"] == doc.json()["hash"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "Where is the vault?"}]
    reply = client.chat.completions.create(
        model="kvchunks",
        messages=question,
        temperature=0,
        max_tokens=16,
        extra_body={"context": "serve-http"},
    )
    cm = make_cm("serve-http-local")
    cm.activate_chunk(cm.add_chunk(DOC).hash)
    local = cm.chat(question, GREEDY)
    assert reply.choices[0].message.content == local.text
    assert reply.model_extra["kvchunks"]["output_chunk"] == local.output_chunk.hash


def test_a_request_stopped_through_ray_serve_keeps_the_answer_so_far(ray_service):
    """The stop reaches the worker's answer through the cluster's client as a Ctrl-C does:
    the stream ends with the answer so far, kept and marked interrupted."""
    url, events = ray_service.http_url, []
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story about an owl."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "context": "serve-stop",
        "request_id": "serve-stop",
    }
    with httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:  # two pieces of text shown
                    assert http.post("/v1/requests/serve-stop/stop").status_code == 200
        extension = events[-1]["kvchunks"]
        assert extension["interrupted"] is True
        answer = http.get(f"/v1/chunks/{extension['output_chunk']}").json()
    assert answer["metadata"]["interrupted"] is True
    assert 2 <= answer["token_count"] < 400


def test_status_shows_workers_pools_and_tiers(ray_service):
    result = CliRunner().invoke(cli, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    workers = {w["name"]: w for w in report["workers"]}
    assert set(workers) == {"worker-0", "worker-1"}
    for w in workers.values():
        assert 0 < w["blocks_free"] <= w["blocks_total"] and w["device"] == "cpu"
    assert set(report["tiers"]) == {"gpu", "cpu", "disk"} and report["registry"]["chunks"] > 0
    table = CliRunner().invoke(cli, ["status"])
    assert table.exit_code == 0 and "worker-1" in table.output and "disk" in table.output


@pytest.mark.parametrize("command", ["status", "stop"])
def test_commands_without_a_cluster_say_so(command):
    nowhere = f"127.0.0.1:{free_port()}"
    kvchunks = str(ray_fixtures.BIN / "kvchunks")
    done = subprocess.run([kvchunks, command, "--address", nowhere], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: no Ray cluster at {nowhere}")
    assert done.stderr.count("\n") == 1


def kv_payload(seed: int):
    from kvchunks.actors.kv_transfer import KVPayload

    k = np.random.default_rng(seed).standard_normal((2, 4, 1, 8), dtype=np.float32)
    return KVPayload(k, -k, "float32")


@contextlib.contextmanager
def tier_manager_on(ray_service, tmp_path, cpu_chunks: int, **host_options):
    """A TierManager (the plain class, here) over a HostStore and a DiskStore for each of
    two made-up nodes, the host budget `cpu_chunks` payloads, the disk's 1,000 bytes."""
    from kvchunks.actors.disk_store import DiskStoreActor
    from kvchunks.actors.host_store import HostStoreActor
    from kvchunks.actors.remote import DISK_STORE, HOST_STORE, NAMESPACE, store_name
    from kvchunks.actors.tier_manager import NodeStores, TierManager
    from kvchunks.policies.budgets import TierBudgets
    from kvchunks.policies.prefetch import Explicit

    def named(kind: str, node: str) -> dict:  # as a service names each node's stores
        return {"name": store_name(kind, node), "namespace": NAMESPACE}

    stores = {
        node: NodeStores(
            HostStoreActor.options(**named(HOST_STORE, node), **host_options).remote(),
            DiskStoreActor.options(**named(DISK_STORE, node)).remote(str(tmp_path / node)),
        )
        for node in ("node-a", "node-b")
    }
    budgets = TierBudgets(cpu_bytes=cpu_chunks * kv_payload(0).nbytes, disk_bytes=1000)
    try:
        yield TierManager(ray_service.service.registry, list(stores), budgets, Explicit()), stores
    finally:
        for node_stores in stores.values():
            ray.kill(node_stores.host)
            ray.kill(node_stores.disk)


def held_in(stores, node: str) -> set[str]:
    return set(get(stores[node].host.sizes.remote()))


def test_tier_manager_keeps_each_nodes_host_and_disk_budgets(ray_service, tmp_path):
    one = kv_payload(0).nbytes
    x, y, z, q = (c * 64 for c in "1234")
    with tier_manager_on(ray_service, tmp_path, cpu_chunks=2) as (manager, stores):

        def offload(chunk_hash: str, node: str, seed: int) -> bool:
            return manager.offload(chunk_hash, node, [ray.put(kv_payload(seed))], one)[0]

        def held(node: str) -> set[str]:
            return held_in(stores, node)

        # Evictions go to the worker's own node, within that node's budget, coldest out first.
        assert offload(x, "node-a", 1) and offload(y, "node-a", 2) and held("node-a") == {x, y}
        spec = {"fingerprint": "f" * 64, "dtype": "float32", "shape": (2, None, 1, 8)}
        assert same_bits(get(manager.fetch(x, "w", "node-b", spec)), kv_payload(1))  # y cold
        kept, dropped = manager.offload(z, "node-a", [ray.put(kv_payload(3))], one)
        assert kept and held("node-a") == {x, z} and held("node-b") == set()
        # y's KV comes back with it (no worker holds it): its file is checked against it.
        assert list(dropped) == [y] and same_bits(get(dropped[y][0]), kv_payload(2))
        # A copy on the requester's own node comes first; each node has a budget of its own.
        assert offload(q, "node-a", 4) and offload(q, "node-b", 5) and held("node-b") == {q}
        assert same_bits(get(manager.fetch(q, "w", "node-b", spec)), kv_payload(5))
        assert same_bits(get(manager.fetch(q, "w", "node-a", spec)), kv_payload(4))
        assert manager.fetch(y, "w", "node-a", spec) is None  # dropped, and no worker holds it
        assert not manager.offload(y, "node-a", [ray.put(kv_payload(6))], 3 * one)[0]  # too big
        assert not offload(y, "node-c", 6)  # a node without stores
        # New files are admitted within each node's disk budget.
        assert manager.admit_file(x, "node-a", 600) and not manager.admit_file(y, "node-a", 600)
        assert manager.admit_file(y, "node-b", 600)
        usage = manager.usage()
        assert usage["node-a"]["disk"]["bytes"] == 600 and usage["node-a"]["cpu"]["chunks"] == 2
        # A deleted chunk leaves every node's host memory and disk budget.
        manager.forget(q)
        assert q not in held("node-a") | held("node-b") and q not in manager.in_host()
        manager.forget(x)
        assert manager.admit_file(y, "node-a", 600)
        transfers = manager.transfers()
        assert transfers["host_dropped"] == 2 and transfers["offload_refused"] == 2


def test_a_chunk_dropped_from_a_host_store_comes_back_only_if_no_pool_holds_it(
    ray_service, tmp_path
):
    """Only a chunk no worker holds needs its file checked: the holder's pool is a copy."""
    client = connect("auto", "host-drop", worker=0)
    doc = client.add_chunk("The tram to Lidingö leaves from Ropsten every twenty minutes.")
    registry = ray_service.service.registry
    assert get(registry.holders.remote(doc.hash)) == ["worker-0"]
    one, lone = kv_payload(0).nbytes, "9" * 64
    try:
        with tier_manager_on(ray_service, tmp_path, cpu_chunks=2) as (manager, stores):
            for chunk_hash, seed in ((doc.hash, 1), (lone, 2)):
                assert manager.offload(chunk_hash, "node-a", [ray.put(kv_payload(seed))], one)[0]
            kept, dropped = manager.offload("8" * 64, "node-a", [ray.put(kv_payload(3))], 2 * one)
            assert kept and held_in(stores, "node-a") == {"8" * 64}
            assert list(dropped) == [lone] and same_bits(get(dropped[lone][0]), kv_payload(2))
    finally:
        client.delete_chunk(doc.hash)


class ForgetBeforePut:
    """A HostStore handle whose put is sent only once the manager has forgotten the chunk,
    or after half a second if the manager holds that `forget` back."""

    def __init__(self, host, manager):
        self.host, self.manager, self.forgets = host, manager, []
        self.put = self

    def __getattr__(self, name: str):  # the store's other methods
        return getattr(self.host, name)

    def remote(self, chunk_hash: str, payload):
        forget = threading.Thread(target=self.manager.forget, args=(chunk_hash,))
        forget.start()
        self.forgets.append(forget)
        forget.join(timeout=0.5)
        return self.host.put.remote(chunk_hash, payload)


def test_a_chunk_deleted_while_it_is_offloaded_is_kept_in_no_host_store(ray_service, tmp_path):
    from kvchunks.actors.tier_manager import NodeStores

    with tier_manager_on(ray_service, tmp_path, cpu_chunks=2) as (manager, stores):
        host = ForgetBeforePut(stores["node-a"].host, manager)
        manager.stores["node-a"] = NodeStores(host, stores["node-a"].disk)
        x = "1" * 64
        assert manager.offload(x, "node-a", [ray.put(kv_payload(1))], kv_payload(1).nbytes)[0]
        host.forgets[0].join()
        # Before, the forget's drop could land first, and the put then kept KV nobody counted.
        assert held_in(stores, "node-a") == set() and manager.in_host() == []


def test_a_disk_store_removes_only_the_files_of_deleted_chunks_and_holds_the_lock(
    ray_service, tmp_path
):
    """A deleted chunk's file goes from every node's disk; one made again with the same
    hash in the meantime (its file written, then its record, under the file's lock) keeps
    the file written for it."""
    from kvchunks.store.kv_file import claimed

    made = connect("auto", "disk-store-remove", worker=0).add_chunk("The heron fishes at dawn.")
    deleted = "e" * 64
    with tier_manager_on(ray_service, tmp_path, cpu_chunks=1) as (_, stores):
        disk, home = stores["node-a"].disk, tmp_path / "node-a"
        for chunk_hash in (made.hash, deleted):
            kv_path(home, chunk_hash).parent.mkdir(parents=True, exist_ok=True)
            kv_path(home, chunk_hash).write_bytes(b"KV")
        get(disk.remove.remote(made.hash))
        assert kv_path(home, made.hash).exists()  # the chunk is in the registry: kept
        with claimed(home, deleted):  # as a worker making the chunk holds it
            removing = disk.remove.remote(deleted)
            time.sleep(0.5)
            assert kv_path(home, deleted).exists()
        get(removing)
        assert not kv_path(home, deleted).exists()


def test_a_restarted_host_store_is_counted_again(ray_service, tmp_path):
    one = kv_payload(0).nbytes
    x, y = "1" * 64, "2" * 64
    with tier_manager_on(ray_service, tmp_path, cpu_chunks=2, max_restarts=1) as (
        manager,
        stores,
    ):
        host = stores["node-a"].host
        assert manager.offload(x, "node-a", [ray.put(kv_payload(1))], one)[0]
        first = get(host.started_as.remote())
        ray.kill(host, no_restart=False)  # it comes back empty
        deadline = time.monotonic() + 60
        while True:  # the kill takes effect later: wait for the new incarnation
            with contextlib.suppress(Exception):
                if get(host.started_as.remote()) != first:
                    break
            assert time.monotonic() < deadline, "the HostStore did not come back"
            time.sleep(0.2)
        assert manager.offload(y, "node-a", [ray.put(kv_payload(2))], one)[0]
        # x went with the store that held it: it is no longer counted in the node's budget.
        assert held_in(stores, "node-a") == {y} and manager.in_host() == [y]
        assert manager.usage()["node-a"]["cpu"] == {"chunks": 1, "bytes": one, "budget": 2 * one}
        assert manager.transfers()["host_recounted"] == 1


def test_restarted_registry_actor_gets_every_pool_again(ray_service):
    from ray.util.state import get_actor

    registry = ray_service.service.registry
    doc = connect("auto", "registry-restart", worker=1).add_chunk("The owl nests in the barn.")
    assert get(registry.holders.remote(doc.hash)) == ["worker-1"]
    ray.kill(registry, no_restart=False)

    def restarted() -> bool:
        state = get_actor(registry._actor_id.hex())
        return state.state == "ALIVE" and state.num_restarts > 0

    wait_for(restarted, "the registry actor never came back")
    # worker-1's pool has not changed since its last report: it reports because it is asked.
    wait_for(
        lambda: get(registry.holders.remote(doc.hash)) == ["worker-1"],
        "worker-1 never reported to the restarted registry actor",
    )


def test_kv_lost_with_its_owner_comes_from_elsewhere(ray_cluster):
    from kvchunks.actors.shared_tiers import SharedTiers

    @ray.remote(num_cpus=0)
    def copy_kv() -> None:
        time.sleep(60)  # still copying when its caller dies

    @ray.remote(num_cpus=0)
    class Owner:  # owns the replies of the calls it makes, as the TierManager does
        def start_copy(self) -> list:
            return [copy_kv.remote()]

    @ray.remote(num_cpus=0)
    class Manager:  # hands out a ref whose owner dies before it is read
        def __init__(self, refs: list):
            self.refs = refs

        def fetch(self, *args):
            return self.refs[0]

    owner = Owner.remote()
    lost = ray.get(owner.start_copy.remote())
    manager = Manager.remote(lost)
    ray.kill(owner)
    with pytest.raises(ray.exceptions.ObjectLostError):
        ray.get(lost[0], timeout=30)
    spec = {"fingerprint": "f" * 64, "dtype": "float32", "shape": (2, None, 1, 8)}
    shared = SharedTiers(None, manager, "worker-x", "node-x", spec)
    chunk = types.SimpleNamespace(hash="ab" * 32, token_count=4)
    assert shared.load(chunk) is None  # then the KV file, or a recompute
    ray.kill(manager)


def test_a_start_that_fails_halfway_leaves_nothing_running(ray_service, tmp_path, monkeypatch):
    from kvchunks.actors import service
    from kvchunks.actors.remote import ServiceUnavailable

    # Its own namespace, so that the session's running service does not count as started.
    monkeypatch.setattr(service, "NAMESPACE", "kvchunks-failed-start")
    home = tmp_path / "home"
    with pytest.raises(ServiceUnavailable) as failed:  # the stores, registry and tiers started
        service.start(1, model=tmp_path / "no-model", home=home, cpus_per_worker=0, timeout=120)
    assert "an actor could not start" in str(failed.value) and "no config.json" in str(failed.value)
    named = ray.util.list_named_actors(all_namespaces=True)
    assert [a for a in named if a["namespace"] == "kvchunks-failed-start"] == []
    # The registry's embedded Redis stopped with it: its record is gone, its server too.
    assert (home / "redis").is_dir() and not (home / "redis" / "kvchunks.db.settings").exists()
    assert not service.is_running()
    monkeypatch.undo()
    assert service.is_running()  # the session's service, untouched: its registry answers
    assert "chunks" in get(ray_service.service.registry.summary.remote())


@pytest.mark.parametrize("damaged", [False, True])
def test_archiving_a_chunk_in_host_store_leaves_only_its_sound_file(ray_service, damaged):
    from kvchunks.store.kv_file import read_kv_file

    s, service = ray_service, ray_service.service
    on_a = connect("auto", f"archive-host-{damaged}", worker=0)
    doc = on_a.add_chunk(f"The {'red' if damaged else 'blue'} kayak is chained to pier 4.")
    assert on_a.move_to_cpu(doc.hash).tier == "cpu"
    assert doc.hash in get(service.tiers.in_host.remote())
    path = kv_path(s.home, doc.hash)
    if damaged:  # damaged while its KV was in the node's host memory
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    assert on_a.archive_to_disk(doc.hash).tier == "disk"
    assert doc.hash not in get(service.tiers.in_host.remote())
    read_kv_file(path, expect_hash=doc.hash)  # sound: the chunk's only copy now
