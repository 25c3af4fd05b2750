"""The HTTP server, for real: uvicorn on a free loopback port, driven by the `openai` package
and `httpx`, over a chunk store whose registry is a standalone Redis (so that the last test
can stop it). One server for the session (`served`, tests/http_fixture.py); the in-process
API on the same store is the oracle.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections import Counter

import httpx
import pytest
from http_fixture import Served

from kvchunks.engine import SamplingParams
from kvchunks.server.errors import as_response
from kvchunks.server.streaming import stream_call
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.hashing import content_hash

DOC = "The ferry to Vaxholm leaves from Strömkajen at 9:15 and takes seventy minutes."
OTHER = "The library on Kungsgatan opens at ten and closes at six, except on Sundays."
ROUTE_TEXT = "The bakery on Drottninggatan sells cardamom buns until they run out."
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def state(served: Served) -> tuple:
    """What a refused request must leave as it was: chunks, and every context's active set."""
    chunks = sorted((c.hash, tuple(c.tags), c.tier) for c in served.cm.list_chunks())
    registry = served.cm.registry
    return chunks, {name: registry.active(name) for name in registry.contexts()}


def add_doc(served: Served, text: str, context: str | None = None) -> dict:
    with served.http() as http:
        doc = http.post("/v1/chunks", json={"text": text, "tags": ["doc"]}).json()
        if context:
            http.post(f"/v1/contexts/{context}/activate", json={"chunk": doc["hash"]})
    return doc


def test_chat_through_openai_equals_the_in_process_api(served):
    doc = add_doc(served, DOC, context="http-chat")
    client = served.openai()
    question = [{"role": "user", "content": "When does the ferry leave?"}]
    reply = client.chat.completions.create(
        model="any",
        messages=question,
        temperature=0,
        max_tokens=12,
        extra_body={"context": "http-chat"},
    )
    oracle = served.cm.with_context("http-chat-oracle")
    oracle.activate_chunk(doc["hash"])
    expected = oracle.chat(question, GREEDY)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    extension = reply.model_extra["kvchunks"]
    assert extension["output_chunk"] == expected.output_chunk.hash
    assert extension["prompt_chunk"] == expected.prompt_chunk.hash
    assert reply.usage.prompt_tokens == doc["token_count"] + expected.prompt_chunk.token_count
    assert reply.usage.completion_tokens == len(expected.token_ids)
    # Streamed: the same text in pieces, then the usage.
    stream = client.chat.completions.create(
        model="any",
        messages=question,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"context": "http-chat"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_a_resent_conversation_is_served_from_its_chunks(served):
    doc = add_doc(served, OTHER, context="http-turns")
    client = served.openai()
    history = [{"role": "user", "content": "When does the library open?"}]
    extra = {"context": "http-turns"}
    first = client.chat.completions.create(
        model="any", messages=history, temperature=0, max_tokens=10, extra_body=extra
    )
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And when does it close?"},
    ]
    second = client.chat.completions.create(
        model="any", messages=history, temperature=0, max_tokens=10, extra_body=extra
    )
    turn = first.usage.prompt_tokens - doc["token_count"] + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= turn + doc["token_count"]
    assert second.model_extra["kvchunks"]["recomputed_tokens"] == 0
    # The in-process API, with the first turn's chunks active, answers the same.
    oracle = served.cm.with_context("http-turns-oracle")
    for ref in (doc["hash"], first.model_extra["kvchunks"]["prompt_chunk"]):
        oracle.activate_chunk(ref)
    oracle.activate_chunk(first.model_extra["kvchunks"]["output_chunk"])
    params = SamplingParams(temperature=0, max_tokens=10)
    expected = oracle.generate("And when does it close?", params)
    assert second.choices[0].message.content == expected.text


def test_completions_chunk_fields_and_stop_strings(served):
    doc = add_doc(served, DOC)
    client = served.openai()
    before = state(served)
    extra = {"context": "http-complete", "chunks": [doc["hash"][:12]], "store": False}

    def complete(**options):
        return client.completions.create(
            model="any",
            prompt="Where does the ferry leave from?",
            temperature=0,
            max_tokens=12,
            extra_body=extra,
            **options,
        )

    def streamed(**options) -> str:
        pieces = [p.choices[0].text for p in complete(stream=True, **options) if p.choices]
        assert "" not in pieces[:-1]  # text from the first piece; the last says why it ended
        return "".join(pieces)

    done = complete()
    assert done.choices[0].text and done.model_extra["kvchunks"]["output_chunk"] is None
    assert state(served) == before  # store: false keeps nothing; chunks: no activation
    assert streamed() == done.choices[0].text
    words = done.choices[0].text.split()
    stop = words[1] if len(words) > 1 else words[0]
    cut = complete(stop=[stop])
    assert cut.choices[0].text == done.choices[0].text.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"
    assert streamed(stop=[stop]) == cut.choices[0].text


def test_every_chunk_route(served):
    with served.http() as http:
        a = http.post("/v1/chunks", json={"text": DOC, "tags": ["route"]})
        assert a.status_code == 201
        a = a.json()
        b = http.post("/v1/chunks", json={"text": ROUTE_TEXT, "role": "user"}).json()
        assert b["role"] == "user" and b["tier"] in ("gpu", "cpu", "disk")
        listed = http.get("/v1/chunks", params={"tag": "route"}).json()["data"]
        assert [c["hash"] for c in listed] == [a["hash"]]
        assert (
            http.get("/v1/chunks", params={"pattern": "Drottninggatan"}).json()["data"][0]["hash"]
            == b["hash"]
        )
        one = http.get(f"/v1/chunks/{a['hash'][:10]}").json()
        assert one["token_ids"] == served.cm.get_chunk(a["hash"]).token_ids
        tagged = http.post(f"/v1/chunks/{a['hash']}/tags", json={"add": ["x"], "remove": ["route"]})
        assert "x" in tagged.json()["tags"] and "route" not in tagged.json()["tags"]
        for tier in ("cpu", "disk", "gpu"):
            moved = http.post(f"/v1/chunks/{a['hash']}/move", json={"tier": tier}).json()
            assert moved["tier"] == tier == served.cm.get_chunk(a["hash"]).tier
        composed = http.post("/v1/chunks/compose", json={"chunks": [a["hash"], b["hash"]]})
        assert composed.status_code == 201 and composed.json()["layout"] == "view"
        head, tail = http.post(f"/v1/chunks/{b['hash']}/split", json={"at": 5}).json()["data"]
        assert (
            head["token_count"] == 5
            and head["token_count"] + tail["token_count"] == b["token_count"]
        )
        # Each listed chunk says what it is and what it hangs under, as `kvchunks tree` draws.
        placed = {c["hash"]: c for c in http.get("/v1/chunks").json()["data"]}
        assert (placed[a["hash"]]["type"], placed[a["hash"]]["follows"]) == ("document", None)
        view = placed[composed.json()["hash"]]
        assert (view["type"], view["follows"]) == ("composed", b["hash"])
        split = placed[head["hash"]]
        assert (split["type"], split["follows"]) == ("split", b["hash"])
        assert one["type"] == "document" and "follows" not in one
        tree = http.get(f"/v1/chunks/{a['hash']}/provenance").json()
        assert composed.json()["hash"] in {c["hash"] for c in tree["children"]}
        assert tree["same_text"] == []  # its text is in no other context
        on = http.post("/v1/contexts/http-routes/activate", json={"chunk": a["hash"]}).json()
        assert on["is_active"]
        context = http.get("/v1/contexts/http-routes").json()
        assert [c["hash"] for c in context["chunks"]] == [a["hash"]]
        assert [c.hash for c in served.cm.with_context("http-routes").context().chunks] == [
            a["hash"]
        ]
        settings = http.post("/v1/contexts/http-routes/settings", json={"mode": "exact"})
        assert settings.json()["mode"] == "exact" and settings.json()["output_tokens"] is None
        # Every setting that can be set can be read back.
        chunked = http.post("/v1/contexts/http-routes/settings", json={"output_tokens": 64})
        assert chunked.json()["output_tokens"] == 64
        assert chunked.json()["mode"] == "exact"  # a setting not sent is left as it was
        assert http.get("/v1/contexts/http-routes").json()["output_tokens"] == 64
        # null sets each setting's default, as OpenAI's null fields mean "the default".
        nulls = dict.fromkeys(("mode", "recompute", "auto_activate", "output_tokens"))
        reset = http.post("/v1/contexts/http-routes/settings", json=nulls).json()
        assert {k: reset[k] for k in nulls} == {
            "mode": "realign",
            "recompute": None,
            "auto_activate": False,
            "output_tokens": None,
        }
        off = http.post("/v1/contexts/http-routes/deactivate", json={"chunk": a["hash"]})
        assert not off.json()["is_active"]
        both = {"chunks": [b["hash"], a["hash"][:8], b["hash"]]}  # all or none, each once
        listed = http.post("/v1/contexts/http-routes/activate", json=both).json()
        assert [(c["hash"], c["is_active"]) for c in listed["data"]] == [
            (b["hash"], True),
            (a["hash"], True),
        ]
        hidden = http.post("/v1/contexts/http-routes/deactivate", json=both).json()
        assert [(c["hash"], c["is_active"]) for c in hidden["data"]] == [
            (b["hash"], False),
            (a["hash"], False),
        ]
        http.post("/v1/contexts/http-routes/activate", json={"chunk": b["hash"]})
        assert http.post("/v1/contexts/http-routes/clear").status_code == 204
        assert http.get("/v1/contexts/http-routes").json()["chunks"] == []
        http.post("/v1/contexts/http-gone/settings", json={"mode": "exact"})
        http.post("/v1/contexts/http-gone/activate", json={"chunk": b["hash"]})
        assert "http-gone" in http.get("/v1/contexts").json()["data"]
        assert http.delete("/v1/contexts/http-gone").status_code == 204
        assert "http-gone" not in http.get("/v1/contexts").json()["data"]
        anew = http.get("/v1/contexts/http-gone").json()  # used again: as a new one
        assert (anew["chunks"], anew["mode"]) == ([], "realign")
        assert http.get(f"/v1/chunks/{b['hash']}").status_code == 200  # chunks stay
        blocked = http.delete(f"/v1/chunks/{a['hash']}")
        assert blocked.status_code == 409 and "cascade" in blocked.json()["error"]["message"]
        gone = http.delete(f"/v1/chunks/{a['hash']}", params={"cascade": "true"}).json()
        assert set(gone["deleted"]) == {a["hash"], composed.json()["hash"]}
        assert http.get(f"/v1/chunks/{a['hash']}").status_code == 404
        [card] = http.get("/v1/models").json()["data"]
        assert card["owned_by"] == "kvchunks" and card["created"] > 1.7e9
        schema = http.get("/openapi.json").json()
        assert "/v1/chat/completions" in schema["paths"] and "/v1/chunks/{ref}" in schema["paths"]


ASKED = [{"role": "user", "content": "Hello"}]


def too_long() -> str:
    return "word " * 9000


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400),
        ("post", "/v1/chat/completions", {"messages": [], "temperature": 5}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "logprobs": True}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "tools": [{"type": "function"}]}, 400),
        (
            "post",
            "/v1/chat/completions",
            {"messages": ASKED, "response_format": {"type": "json_object"}},
            400,
        ),
        ("post", "/v1/completions", {"prompt": "x", "echo": True}, 400),
        ("post", "/v1/chunks", {"text": "   "}, 400),
        ("post", "/v1/chunks", {"text": "x", "tags": ["has space"]}, 400),
        ("get", "/v1/chunks/0000aaaa", None, 404),
        ("post", "/v1/contexts/c/activate", {"chunk": "ffff0000"}, 404),
        ("post", "/v1/contexts/c/activate", {}, 400),
        ("post", "/v1/contexts/c/activate", {"chunk": "ffff0000", "chunks": ["ffff0000"]}, 400),
        ("post", "/v1/contexts/c/activate", {"chunks": "ffff0000"}, 400),
        ("post", "/v1/contexts/c/deactivate", {"chunks": ["ffff0000"]}, 404),
        ("post", "/v1/contexts/c/deactivate", {}, 400),
        ("post", "/v1/chunks", {"text": too_long()}, 400),
        (
            "post",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": too_long()}]},
            400,
        ),
        ("post", "/v1/chunks", {"text": "x" * (9 << 20)}, 413),
        ("post", "/v1/chunks", {"text": "x", "tag": ["misspelt"]}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "seed": 2**70}, 400),
        (
            "post",
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": "Be brief."}, *ASKED], "seed": 2**70},
            400,
        ),
        (
            "post",
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in it?"},
                            {"type": "image_url", "image_url": {"url": "data:,"}},
                        ],
                    }
                ]
            },
            400,
        ),
        ("post", "/v1/contexts/c/settings", {"auto_activte": True}, 400),
        ("post", "/v1/contexts/c/settings", {"output_tokens": 0}, 400),
        ("post", "/v1/chunks/0000aaaa/split", {"at": True}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "max_tokens": True}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "seed": True}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "temperature": True}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "recompute": True}, 400),
        ("post", "/v1/contexts/c/settings", {"recompute": True}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "min_tokens": 100}, 400),
        ("post", "/v1/chat/completions", {"messages": [{"role": ["user"], "content": "x"}]}, 400),
        ("post", "/v1/completions", {"prompt": " "}, 400),
        ("post", "/v1/completions", {"prompt": "x", "logprobs": 0}, 400),  # the chosen's
        ("post", "/v1/chat/completions", {"messages": ASKED, "chunk": ["0000aaaa"]}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "guided_decoding_backend": "x"}, 400),
        ("post", "/v1/chat/completions", {"messages": ASKED, "skip_special_tokens": False}, 400),
        (
            "post",
            "/v1/chat/completions",
            {"messages": ASKED, "stream_options": {"include_usage": True}},
            400,
        ),
        ("get", "/v1/chunks?tags=misspelt", None, 400),  # would list every chunk
        ("delete", "/v1/chunks/0000aaaa?casade=true", None, 400),
        ("post", "/v1/contexts/c/clear", {"all": True}, 400),
        ("get", "/v1/models/no-such-model", None, 404),
        ("get", "/v1/no-such-route", None, 404),
        ("put", "/v1/chunks", None, 405),
    ],
)
def test_errors_are_openai_json_and_change_nothing(served, method, path, body, status):
    before = state(served)
    with served.http() as http:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and "\n" not in error["message"]
    assert state(served) == before


def test_a_wrong_field_is_named_where_it_is_wrong(served):
    """A union's member (str | list[str]) is no place in the request: the message names the
    field, and the element of a list that is wrong."""
    with served.http() as http:
        for stop, says in (([5], "stop.0: Input should be a valid string"), (5, "stop: Input")):
            response = http.post("/v1/chat/completions", json={"messages": ASKED, "stop": stop})
            assert response.status_code == 400
            assert response.json()["error"]["message"].startswith(says), response.text
        # NaN is not out of a range: it is no number to compare.
        nan = json.dumps({"messages": ASKED, "top_p": math.nan})  # Python's json writes NaN
        headers = {"content-type": "application/json"}
        response = http.post("/v1/chat/completions", content=nan, headers=headers)
        says = "top_p: Input should be a finite number"
        assert response.json()["error"]["message"].startswith(says), response.text
        # A rule over two fields is the body's: said as it is.
        neither = http.post("/v1/contexts/c/activate", json={}).json()["error"]["message"]
        assert neither == "give either 'chunk' (one hash) or 'chunks' (a list of hashes)"


def test_openai_fields_that_ask_for_nothing_are_answered(served):
    """What clients send for fields they leave unset is no reason to refuse a request."""
    question = {
        "messages": ASKED,
        "max_tokens": 2,
        "store": False,
        "logprobs": False,
        "top_logprobs": 0,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "user": "someone",
        # vLLM's, at what kvchunks does anyway; and fields it does not know, left unset.
        "skip_special_tokens": True,
        "add_generation_prompt": True,
        "reasoning_effort": None,
        "chat_template_kwargs": {},
        # OpenAI's fields are nullable, and the openai package sends null for None.
        **dict.fromkeys(["temperature", "top_p", "n", "seed", "stream"], None),
        **dict.fromkeys(["presence_penalty", "frequency_penalty", "repetition_penalty"], None),
        "stream_options": {"include_usage": None},
    }
    with served.http() as http:
        response = http.post("/v1/chat/completions", json=question)
        assert response.status_code == 200, response.text
        unset = http.post("/v1/chat/completions", json={**question, "store": None})
    assert unset.status_code == 200, unset.text  # null: the default, which stores
    assert unset.json()["kvchunks"]["prompt_chunk"] is not None


def test_vllm_sampling_extensions_are_served(served):
    """top_k, stop_token_ids and ignore_eos change the answer as they do in process."""
    client = served.openai()

    def reply(max_tokens: int = 6, **options):
        extra = {"context": "http-vllm", "store": False, **options}
        return client.chat.completions.create(
            model="any", messages=ASKED, max_tokens=max_tokens, extra_body=extra
        )

    def answer(**options) -> str:
        return reply(**options).choices[0].message.content

    sampled = {answer(temperature=2.0, top_k=1, seed=seed) for seed in (1, 2)}
    assert sampled == {answer(temperature=0)}  # top_k 1: greedy at any seed
    greedy = reply(temperature=0)
    # The first token of the answer stops it: it is kept, as vLLM keeps it.
    every_token = list(range(served.cm.store.model.tokenizer.vocab_size))
    first = reply(temperature=0, stop_token_ids=every_token)
    assert first.usage.completion_tokens == 1 and first.choices[0].finish_reason == "stop"
    assert greedy.choices[0].message.content.startswith(first.choices[0].message.content)
    ended = reply(40, temperature=0).usage.completion_tokens
    assert ended < 40  # the greedy answer to a greeting ends by itself
    assert reply(40, temperature=0, ignore_eos=True).usage.completion_tokens == 40


def test_each_error_class_has_its_status():
    from kvchunks import common

    expected = {
        common.ChunkNotFound("x"): (404, "not_found_error"),
        common.AmbiguousHash("ab", ["ab1", "ab2"]): (409, "conflict_error"),
        common.DtypeMismatch("chunk x", "bfloat16", "float32"): (409, "conflict_error"),
        common.ChunkInUse("x"): (409, "conflict_error"),
        common.ConcurrentChange("x"): (409, "conflict_error"),
        common.ContextWindowExceeded("x"): (400, "context_length_exceeded"),
        common.RegistryUnavailable("x"): (503, "service_unavailable"),
        common.ServiceUnavailable("x"): (503, "service_unavailable"),
        common.CapacityError("x"): (507, "insufficient_storage"),  # this request's KV: not down
        common.ChunkFileError("x"): (500, "server_error"),
        common.InvalidInput("x"): (400, "invalid_request_error"),
    }
    for error, (status, kind) in expected.items():
        answer = as_response(error)
        assert answer.status_code == status, error
        assert json.loads(answer.body)["error"]["type"] == kind, error


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_an_answer_cut_by_max_tokens_ends_for_length(served, stream):
    client = served.openai()
    asked = {"model": "any", "temperature": 0, "extra_body": {"ignore_eos": True, "store": False}}
    messages = [{"role": "user", "content": "Count to ten."}]
    chat = client.chat.completions.create(messages=messages, max_tokens=2, stream=stream, **asked)
    choices = [c for part in chat for c in part.choices] if stream else chat.choices
    assert choices[-1].finish_reason == "length"
    # /v1/completions without max_tokens answers 16 tokens, as OpenAI's does.
    done = client.completions.create(prompt="Count to ten.", **asked)
    assert done.usage.completion_tokens == 16 and done.choices[0].finish_reason == "length"


def test_a_blank_completion_prompt_is_named_as_such(served):
    with served.http() as http:
        refused = http.post("/v1/completions", json={"prompt": " ", "max_tokens": 2})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "prompt must be non-empty text"


def test_a_model_is_found_by_its_id(served):
    client = served.openai()
    [listed] = client.models.list().data
    assert client.models.retrieve(listed.id).id == listed.id


def test_an_answer_in_parts_names_every_chunk_it_stored(served):
    with served.http() as http:
        http.post("/v1/contexts/http-parts/settings", json={"output_tokens": 2})
        reply = http.post(
            "/v1/chat/completions",
            json={"context": "http-parts", "messages": ASKED, "max_tokens": 5, "temperature": 0},
        ).json()["kvchunks"]
    stored = [served.cm.get_chunk(h) for h in reply["output_chunks"]]
    assert len(stored) >= 2 and stored[-1].hash == reply["output_chunk"]
    assert all(c.kind == "output" and c.token_count <= 2 for c in stored)
    assert stored[1].parent_chunks[-1] == stored[0].hash  # one answer, in order


def test_a_bug_in_a_generation_is_logged_with_its_traceback(caplog):
    """Errors of a generation's thread do not reach the app's handlers: the response says
    only that it is a bug, and the log has the rest."""
    try:
        raise RuntimeError("the secret detail")
    except RuntimeError as e:
        response = as_response(e)
    assert response.status_code == 500
    assert "RuntimeError" in response.body.decode() and b"secret" not in response.body
    [record] = [r for r in caplog.records if r.name == "kvchunks.server"]
    assert record.exc_info and "the secret detail" in caplog.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chunks", '{"text": "lone \\ud800 surrogate"}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "lone \\ud800"}]}'),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\\ud800"]}',
        ),
    ],
)
def test_text_that_is_not_unicode_is_refused(served, path, body):
    """JSON may escape half of a surrogate pair alone: no tokenizer takes that text."""
    before = state(served)
    with served.http() as http:
        headers = {"content-type": "application/json"}
        response = http.post(path, content=body.encode(), headers=headers)
    assert response.status_code == 400, response.text
    assert "lone surrogate" in response.json()["error"]["message"]
    assert state(served) == before


@pytest.mark.parametrize(
    ("content", "content_type", "says"),
    [
        (b'{"text": "x"}', "application/x-www-form-urlencoded", "Content-Type: application/json"),
        (b'["x"]', "application/json", "must be a JSON object"),
        (b'{"text": "x",', "application/json", "not valid JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_says_so(served, content, content_type, says):
    before = state(served)
    with served.http() as http:
        response = http.post("/v1/chunks", content=content, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]
    assert state(served) == before


def test_a_body_sent_in_chunks_is_held_to_the_limit(served):
    """No Content-Length to refuse it by: the server counts the bytes as they come."""
    before = state(served)
    body = json.dumps({"text": "x" * (9 << 20)}).encode()
    pieces = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))
    with served.http() as http:
        headers = {"content-type": "application/json"}
        response = http.post("/v1/chunks", content=pieces, headers=headers)
    assert response.status_code == 413, response.text[:200]
    assert response.json()["error"]["type"] == "request_too_large"
    assert state(served) == before


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_not(served, chunked):
    """The limit is inclusive, whether the size is announced or counted as it comes."""
    from kvchunks.server.app import MAX_BODY_BYTES

    text = f"A body of exactly the limit, sent {'in chunks' if chunked else 'whole'}."
    head = json.dumps({"text": text}).encode()

    def post(size: int) -> httpx.Response:
        body = head[:-1] + b" " * (size - len(head)) + b"}"  # JSON whitespace pads it
        content = (body[i : i + (1 << 20)] for i in range(0, size, 1 << 20)) if chunked else body
        with served.http() as http:
            headers = {"content-type": "application/json"}
            return http.post("/v1/chunks", content=content, headers=headers)

    before = state(served)
    refused = post(MAX_BODY_BYTES + 1)
    assert refused.status_code == 413, refused.text[:200]
    assert refused.json()["error"]["type"] == "request_too_large"
    assert state(served) == before
    accepted = post(MAX_BODY_BYTES)
    assert accepted.status_code == 201, accepted.text[:200]
    assert served.cm.get_chunk(accepted.json()["hash"]).text == text
    served.cm.delete_chunk(accepted.json()["hash"])


def test_tags_are_all_checked_before_any_changes(served):
    doc = add_doc(served, ROUTE_TEXT)
    before = state(served)
    with served.http() as http:
        body = {"add": ["kept"], "remove": ["has space"]}
        response = http.post(f"/v1/chunks/{doc['hash']}/tags", json=body)
    assert response.status_code == 400, response.text
    assert state(served) == before


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_goes_away_stops_its_answer(served, stream):
    """The answer stops at its next token, streamed or not: its KV goes back to the pool and
    nothing of it is stored (it would be, had it run to the end for nobody)."""
    llm = served.cm.store.model.llm
    before, free = state(served), llm.pool_usage()["free"]
    question = {
        "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
        "max_tokens": 1000,
        "temperature": 0,
        "stream": stream,
        "context": "http-gone",
    }
    with served.http() as http:
        if stream:
            with http.stream("POST", "/v1/chat/completions", json=question) as r:
                assert r.status_code == 200
                assert next(line for line in r.iter_lines() if '"content"' in line)
        else:
            with pytest.raises(httpx.ReadTimeout):
                timeout = httpx.Timeout(5, read=2)
                http.post("/v1/chat/completions", json=question, timeout=timeout)
    deadline = time.monotonic() + 20
    while llm.pool_usage()["free"] != free and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.pool_usage()["free"] == free
    assert state(served) == before


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_goes_away_during_the_prefill_stops_it(served, stream):
    """Each layer slowed to 0.1 s, so that one pass takes 3 s: the client gives up after
    0.5 s, before any text, and the prompt's pass stops within a few layers of that, with
    nothing stored and its KV back in the pool (before, it ran to the first token)."""
    llm = served.cm.store.model.llm
    with served.http() as http:  # the opening's KV, computed before any slowing
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    before, free, layers_run = state(served), llm.pool_usage()["free"], []

    def slowly(*_) -> None:
        layers_run.append(1)
        time.sleep(0.1)

    hooks = [layer.register_forward_hook(slowly) for layer in llm.runner.model.layers]
    question = {
        "messages": [{"role": "user", "content": "Tell me about the ferries of Stockholm."}],
        "max_tokens": 100,
        "stream": stream,
        "context": "http-gone-early",
    }
    try:
        with served.http() as http, pytest.raises(httpx.ReadTimeout):
            timeout = httpx.Timeout(5, read=0.5)
            if stream:
                with http.stream("POST", "/v1/chat/completions", json=question, timeout=timeout):
                    pass
            else:
                http.post("/v1/chat/completions", json=question, timeout=timeout)
        deadline = time.monotonic() + 20
        while llm.pool_usage()["free"] != free and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for hook in hooks:
            hook.remove()
    assert llm.pool_usage()["free"] == free
    assert 5 <= len(layers_run) < 20  # of the pass's 30 layers
    assert state(served) == before


def _answering(llm, tokens: int) -> bool:
    return any(len(seq.completion_token_ids) >= tokens for seq in list(llm.scheduler.running))


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_request_stopped_by_its_id_ends_with_the_answer_so_far_kept(served, stream):
    """POST /v1/requests/{id}/stop stops the answer as a Ctrl-C does: the response, streamed
    or not, ends with the answer so far, kept as a chunk marked interrupted after the kept
    prompt; the name is then free, and a stop of it a 404."""
    llm = served.cm.store.model.llm
    question = "Tell me a long story about a lighthouse keeper."
    request_id = f"stop-{'streamed' if stream else 'whole'}"
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 1000,
        "temperature": 0,
        "stream": stream,
        "context": f"http-{request_id}",
        "request_id": request_id,
    }
    reply: dict = {}

    def ask() -> None:
        with served.http() as http:
            if not stream:
                reply["whole"] = http.post("/v1/chat/completions", json=body).json()
                return
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
                reply["events"] = [json.loads(line) for line in lines]

    asking = threading.Thread(target=ask)
    asking.start()
    deadline = time.monotonic() + 60
    while not _answering(llm, 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    with served.http() as http:
        again = http.post("/v1/chat/completions", json=body)
        assert again.status_code == 409, again.text  # its name is taken while it runs
        stopped = http.post(f"/v1/requests/{request_id}/stop")
        assert stopped.json() == {"request_id": request_id, "stopping": True}, stopped.text
        asking.join(60)
        assert http.post(f"/v1/requests/{request_id}/stop").status_code == 404
    if stream:
        events = reply["events"]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        ending = events[-1]
    else:
        ending = reply["whole"]
        text = ending["choices"][0]["message"]["content"]
    extension = ending["kvchunks"]
    assert extension["interrupted"] is True
    assert ending["choices"][0]["finish_reason"] == "stop"
    answer = served.cm.get_chunk(extension["output_chunk"])
    prompt = served.cm.get_chunk(extension["prompt_chunk"])
    assert answer.metadata["interrupted"] is True and answer.parent_chunks[-1] == prompt.hash
    assert prompt.text.strip() == question
    assert 3 <= len(answer.token_ids) < 1000 and answer.text.startswith(text) and text
    assert llm.scheduler.is_finished()  # (its reserve may have moved other chunks out)
    served.cm.delete_chunk(answer.hash)
    served.cm.delete_chunk(prompt.hash)


def test_a_request_stopped_before_its_first_token_keeps_nothing(served):
    """Before the first token the stop ends the request with a 499 and its JSON error, and
    nothing of it is kept (as a Ctrl-C then); a bad or unknown name is refused."""
    llm = served.cm.store.model.llm
    with served.http() as http:  # the opening's KV, computed before any slowing
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    before, free = state(served), llm.pool_usage()["free"]
    hooks = [
        layer.register_forward_hook(lambda *_: time.sleep(0.1)) for layer in llm.runner.model.layers
    ]
    body = {
        "messages": [{"role": "user", "content": "Tell me about the ferries of Stockholm."}],
        "stream": True,
        "context": "http-stopped-early",
        "request_id": "stopped-early",
    }
    reply: dict = {}

    def ask() -> None:
        with served.http() as http:
            reply["response"] = http.post("/v1/chat/completions", json=body)

    asking = threading.Thread(target=ask)
    try:
        asking.start()
        time.sleep(0.5)  # into the prompt's pass of 3 s
        with served.http() as http:
            assert http.post("/v1/requests/stopped-early/stop").status_code == 200
        asking.join(30)
    finally:
        for hook in hooks:
            hook.remove()
    response = reply["response"]
    assert response.status_code == 499, response.text
    assert response.json()["error"] == {
        "message": "stopped before the first token: nothing was kept",
        "type": "request_stopped",
        "code": 499,
    }
    assert state(served) == before and llm.pool_usage()["free"] == free
    with served.http() as http:
        unknown = http.post("/v1/requests/stopped-early/stop")
        assert unknown.status_code == 404, unknown.text
        assert "no running request" in unknown.json()["error"]["message"]
        bad = http.post("/v1/chat/completions", json={**body, "request_id": "a b"})
        assert bad.status_code == 400 and "request_id" in bad.json()["error"]["message"]
    assert state(served) == before


def test_the_first_piece_is_sent_before_the_next_is_computed():
    """On few cores the next step's compute would hold back the event loop that sends the
    first piece: the generation waits until the consumer has taken it and asks for more."""
    order: list[str] = []

    def generate(on_text, check_stop) -> str:
        on_text("first")
        order.append("computed the next piece")
        return "done"

    async def consume() -> None:
        events = stream_call(generate, asyncio.Semaphore(1), still_here)
        assert await anext(events) == ("text", "first")
        await asyncio.sleep(0.005)  # sending it
        order.append("sent the first piece")
        assert [e async for e in events] == [("result", "done")]

    asyncio.run(consume())
    assert order == ["sent the first piece", "computed the next piece"]


async def still_here() -> bool:
    return False


def test_a_call_whose_client_left_while_it_waited_for_its_slot_is_not_run():
    """All slots taken: a request waits its turn; its client gone by then, nothing is
    computed for it, and its slot goes to the next."""
    ran: list[str] = []

    async def left() -> bool:
        return True

    async def consume() -> None:
        slots = asyncio.Semaphore(1)
        await slots.acquire()  # another generation's
        events = stream_call(lambda **_: ran.append("ran"), slots, left)
        waiting = asyncio.ensure_future(anext(events, None))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # its turn has not come
        slots.release()
        assert await waiting is None and ran == []
        assert not slots.locked()

    asyncio.run(consume())


def test_an_ambiguous_prefix_is_409(served):
    """Two records whose hashes share their first 8 hex digits (written straight to the
    registry: content addresses that collide so early are made up, not computed)."""
    registry = served.cm.registry
    made = []
    for tail in ("1" * 56, "2" * 56):
        ids = [1, 2, 3]
        record = ChunkInfo(hash="abcdef01" + tail, content_hash=content_hash(ids), token_ids=ids)
        registry.put(record)
        made.append(record.hash)
    try:
        before = state(served)
        with served.http() as http:
            response = http.post("/v1/contexts/amb/activate", json={"chunk": "abcdef01"})
        assert response.status_code == 409, response.text
        assert "abcdef01" in response.json()["error"]["message"]
        assert state(served) == before
    finally:
        for chunk_hash in made:
            registry.delete(chunk_hash)


def test_the_api_key_is_required(served):
    with served.http(key=None) as http:
        assert http.get("/v1/chunks").status_code == 401
        assert http.get("/metrics").status_code == 401  # what is stored and how it is used
        assert http.get("/health").status_code == 200
    with served.http() as http:  # the scheme's name in any case, as HTTP allows
        bearer = {"Authorization": http.headers["Authorization"].replace("Bearer", "bearer")}
        assert http.get("/v1/chunks", headers=bearer).status_code == 200
    with served.http(key="wrong") as http:
        refused = http.post("/v1/chunks", json={"text": "Not stored."})
        assert (
            refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        )
        assert refused.headers["WWW-Authenticate"] == "Bearer"  # RFC 6750
    assert not served.cm.list_chunks(pattern="Not stored")


def test_metrics_count_requests_tokens_and_tiers(served):
    with served.http() as http:
        question = {"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 4}
        assert http.post("/v1/chat/completions", json=question).status_code == 200
        text = http.get("/metrics").text
    for name in (
        "kvchunks:requests_total",
        "kvchunks:prompt_tokens_reused_total",
        "kvchunks:time_to_first_token_seconds_bucket",
        "kvchunks:file_loads_total",
        "kvchunks:evictions_total",
        "kvchunks:pool_blocks_free",
        "kvchunks:disk_bytes",
    ):
        assert name in text, name
    served_chats = [
        line for line in text.splitlines() if line.startswith("kvchunks:requests_total{")
    ]
    assert any(
        'route="/v1/chat/completions"' in line and 'status="200"' in line for line in served_chats
    )


def test_sixteen_clients_for_a_minute(served):
    """Streaming chats, chunk routes and deletes at once: no 5xx, nothing acknowledged lost,
    the store's invariants hold."""
    stop_at = time.monotonic() + 60
    kept: dict[int, set[str]] = {}
    failures: list[str] = []
    counts: Counter[str] = Counter()

    def client(i: int) -> None:
        rng, mine = random.Random(i), kept.setdefault(i, set())
        context = f"load-{i}"
        with served.http() as http:
            while time.monotonic() < stop_at:
                action = rng.choice(["chat", "chat", "add", "list", "toggle", "delete"])
                response = None
                if action == "chat":
                    body = {
                        "messages": [{"role": "user", "content": f"Say a colour, {i}."}],
                        "max_tokens": 6,
                        "temperature": 0,
                        "stream": True,
                        "context": context,
                    }
                    with http.stream("POST", "/v1/chat/completions", json=body) as response:
                        lines = [line for line in response.iter_lines() if line]
                    if response.status_code == 200 and lines[-1] != "data: [DONE]":
                        failures.append(f"client {i}: a stream ended without [DONE]")
                elif action == "add":
                    text = (
                        f"Note {i}-{rng.randrange(10**6)}: the tide turns at {rng.randrange(24)}."
                    )
                    response = http.post("/v1/chunks", json={"text": text})
                    if response.status_code == 201:
                        mine.add(response.json()["hash"])
                elif action == "list":
                    response = http.get("/v1/chunks", params={"pattern": f"Note {i}-"})
                elif action == "toggle" and mine:
                    ref = rng.choice(sorted(mine))
                    response = http.post(f"/v1/contexts/{context}/activate", json={"chunk": ref})
                    if response.status_code == 200:
                        response = http.post(
                            f"/v1/contexts/{context}/deactivate", json={"chunk": ref}
                        )
                elif action == "delete" and mine:
                    ref = rng.choice(sorted(mine))
                    response = http.delete(f"/v1/chunks/{ref}")
                    if response.status_code == 200:
                        mine.discard(ref)
                if response is not None:
                    counts[action] += 1
                    if response.status_code >= 500:
                        failures.append(f"client {i} {action}: {response.status_code}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    assert counts["chat"] >= 16 and counts["add"] >= 16, counts
    listed = {c.hash for c in served.cm.list_chunks()}
    assert set().union(*kept.values()) <= listed
    served.cm.store.wait_for_transfers()
    assert served.cm.store.violations() == []


def test_registry_down_is_503_and_changes_nothing(served):
    before = state(served)
    served.redis.kill()
    try:
        with served.http() as http:
            for method, path, body in (
                ("get", "/v1/chunks", None),
                ("post", "/v1/chunks", {"text": "Written while Redis is down."}),
                (
                    "post",
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Hi?"}]},
                ),
                ("get", "/health", None),  # not up: a load balancer looks elsewhere
            ):
                response = http.request(method, path, json=body)
                assert response.status_code == 503, response.text
                assert json.loads(response.text)["error"]["type"] == "service_unavailable"
            assert http.head("/health").status_code == 503
    finally:
        served.redis.start()
    assert state(served) == before
    with served.http(key=None) as http:  # open to checkers without the key, GET or HEAD
        assert http.get("/health").json() == {"status": "ok"}
        assert http.head("/health").status_code == 200


def test_the_server_keeps_the_api_objects_of_recent_contexts_only(served, monkeypatch):
    """One object per context name sent, kept while among the most recently used: a server
    with a context per user does not keep one for every name it was ever sent."""
    from kvchunks.server.backend import LocalBackend

    backend = LocalBackend(served.cm)
    monkeypatch.setattr(LocalBackend, "KEPT", 2)
    a, b = backend.manager("kept-a"), backend.manager("kept-b")
    assert backend.made("kept-a") is a  # used again: now the most recent
    c = backend.manager("kept-c")  # kept-b, the least recently used, is let go
    assert backend.made("kept-b") is None
    assert backend.made("kept-a") is a and backend.manager("kept-c") is c
    assert backend.manager(served.cm.context_name) is served.cm  # the server's own stays
    again = backend.manager("kept-b")  # made again when asked for, over the same store
    assert again is not b and again.context_name == "kept-b" and again.store is b.store
