"""One API scenario against ContextManager (in process) and Client (over Ray actors): the same
methods, the same answers, the same typed errors."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import ray_fixtures

from kvchunks.actors.client import Client, connect
from kvchunks.actors.remote import CONTEXT_METHODS, get
from kvchunks.common import AmbiguousHash, ChunkInUse, ChunkNotFound, InvalidInput
from kvchunks.engine import SamplingParams
from kvchunks.service.context_manager import ContextManager

ray_cluster, ray_service = ray_fixtures.ray_cluster, ray_fixtures.ray_service  # used by name

GREEDY = SamplingParams(temperature=0, max_tokens=12)
DOC_A = "Varden Isle notes: the lighthouse keeper is Oskar Lind. He rings the bell at dawn."
DOC_B = "Varden Isle notes: the ferry leaves Brekke harbour twice a day, at nine and at four."
APIS = ("ContextManager", "Client")
RESULTS: dict[str, dict] = {}


def open_api(request: pytest.FixtureRequest, name: str) -> tuple:
    """(the API object, a function that stores a raw chunk record in its registry)."""
    if name == "ContextManager":
        cm = request.getfixturevalue("make_cm")("ray-api")
        return cm, cm.registry.put
    service = request.getfixturevalue("ray_service").service
    client = connect("auto", "ray-api")
    return client, lambda chunk: get(service.registry.call.remote("put", chunk))


@pytest.fixture(params=APIS)
def api(request):
    """(name, the API object, its raw record writer): see open_api."""
    return request.param, *open_api(request, request.param)


def brief(chunk) -> tuple:
    """What must be equal in both: everything but pool block ids and clock readings."""
    meta = {k: v for k, v in chunk.metadata.items() if k != "timestamp"}
    fields = dataclasses.asdict(chunk) | {"metadata": meta}
    return tuple((k, repr(v)) for k, v in fields.items() if k not in ("segments", "created_at"))


def error_of(call) -> tuple[str, str]:
    with pytest.raises(Exception) as info:
        call()
    assert "\n" not in str(info.value)
    return type(info.value).__name__, str(info.value)


def scenario(cm, put) -> dict:
    out: dict = {}
    a = cm.add_chunk(DOC_A, tags=["isle"])
    b = cm.add_chunk(DOC_B)
    out["dedup"] = cm.add_chunk(DOC_A).hash == a.hash
    out["added"] = [brief(a), brief(b)]
    out["tagged"] = brief(cm.tag_chunk(b.hash[:8], "isle"))
    out["by_tag"] = [c.hash for c in cm.list_chunks(tag="isle")]
    out["by_text"] = [c.hash for c in cm.list_chunks(pattern="Brekke")]
    cm.activate_chunk(a.hash[:10])
    g = cm.generate("Who is the lighthouse keeper?", GREEDY)
    out["answer"] = [g.text, g.token_ids, g.finish_reason]
    out["answer_chunks"] = [brief(g.prompt_chunk), brief(g.output_chunk)]
    out["provenance"] = cm.get_chunk(g.output_chunk.hash).parent_chunks
    assert out["provenance"] == [a.hash, g.prompt_chunk.hash]
    out["graph"] = [[brief(c) for c in side] for side in cm.provenance(g.prompt_chunk.hash)]
    view = cm.context()
    out["context"] = [view.name, view.mode, view.window, [c.hash for c in view.chunks]]
    cm.activate_chunk(b.hash)
    out["reordered"] = [c.hash for c in cm.reorder_chunks([b.hash, a.hash[:10]]).chunks]
    assert out["reordered"] == [b.hash, a.hash]
    cm.clear()
    out["together"] = [c.hash for c in cm.activate_chunks([b.hash[:10], a.hash, b.hash])]
    assert [c.hash for c in cm.context().chunks] == out["together"] == [b.hash, a.hash]
    out["apart"] = [c.hash for c in cm.deactivate_chunks([b.hash, a.hash[:10]])]
    assert cm.context().chunks == [] and out["apart"] == [b.hash, a.hash]
    cm.activate_chunk(a.hash)
    composed = cm.compose_chunks([a.hash, b.hash])
    head, tail = cm.split_chunk(composed.hash, 7)
    out["views"] = [brief(composed), brief(head), brief(tail)]
    out["ref_count"] = cm.get_chunk(a.hash).ref_count
    out["deactivated"] = brief(cm.deactivate_chunk(a.hash))
    twin = a.hash[:6] + ("0" if a.hash[6] != "0" else "1") + a.hash[7:]
    put(dataclasses.replace(a, hash=twin, segments=[], tags=[]))
    out["errors"] = [
        error_of(lambda: cm.get_chunk("0123dead4567")),
        error_of(lambda: cm.activate_chunk(a.hash[:6])),
        error_of(lambda: cm.add_chunk("   ")),
        error_of(lambda: cm.delete_chunk(a.hash)),
        error_of(lambda: cm.split_chunk(b.hash, 0)),
        error_of(lambda: cm.generate("Who?", GREEDY, on_text="print")),
    ]
    assert [e[0] for e in out["errors"]] == [
        ChunkNotFound.__name__,
        AmbiguousHash.__name__,
        InvalidInput.__name__,
        ChunkInUse.__name__,
        InvalidInput.__name__,
        InvalidInput.__name__,
    ]
    out["deleted"] = [
        cm.delete_chunk(twin),
        sorted(cm.delete_chunk(a.hash, cascade=True)),
        cm.delete_chunk(b.hash),
        cm.delete_chunk(g.output_chunk.hash),
        cm.delete_chunk(g.prompt_chunk.hash),
    ]
    out["left"] = [c.hash for c in cm.list_chunks(pattern="Varden")]
    return out


def test_api_scenario(api):
    name, cm, put = api
    RESULTS[name] = scenario(cm, put)
    assert RESULTS[name]["dedup"] and RESULTS[name]["left"] == []


def test_client_answers_equal_context_manager_answers(request):
    # Run on its own (or after test_api_scenario failed for one side), it makes the missing
    # side's results itself rather than compare nothing.
    for name in APIS:
        if name not in RESULTS:
            RESULTS[name] = scenario(*open_api(request, name))
    for key, expected in RESULTS["ContextManager"].items():
        assert RESULTS["Client"][key] == expected, key


def public(cls: type) -> dict[str, object]:
    return {n: m for n, m in inspect.getmembers(cls) if not n.startswith("_")}


def arguments(method) -> list[tuple]:
    params = inspect.signature(method).parameters.values()
    return [(p.name, p.kind, p.default) for p in params]


def test_client_has_exactly_the_context_manager_methods():
    ours, theirs = public(Client), public(ContextManager)
    assert set(ours) == set(theirs)
    client_side = {"close", "with_context", "track_output", "generate", "chat"}
    assert set(theirs) - client_side == CONTEXT_METHODS
    for name, member in theirs.items():
        if callable(member):
            assert arguments(getattr(Client, name)) == arguments(member), name
        else:
            assert isinstance(ours[name], property), name
