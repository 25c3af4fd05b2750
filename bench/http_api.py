"""The HTTP server against the in-process API it serves, in one run (`kvchunks bench
http_api`; not `http.py`, which would shadow the standard library's `http` for every
benchmark run as `python bench/NAME.py`).

1. Time to first token of the same chat request (one document active, a new question each
   time, `store: false` so that every request computes its prompt): streamed with the
   `openai` package from `kvchunks http` running in its own process, against
   `ContextManager.chat` in this process over the same data directory, with a streaming
   callback. The median of --repeats runs of each, taken in turn. `http_ttft_ratio` is
   HTTP's over the API's (goal <= 1.10).
2. Chunk-route requests per second over one keep-alive connection: GET /v1/chunks/{ref}, and
   activate + deactivate pairs (two requests each), against the same calls in process.
3. A client that leaves during a long prefill: the time to first token of a long message
   (--long-copies times the document) run to its first token, against a short question's
   sent right after another client sent the same long message and went away 0.3 s into its
   prefill (the server stops the abandoned pass within a layer, so the short one waits only
   for that; `left_prefill_cost_s` is what it waited beyond a short question's own TTFT).

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from kvchunks.bench import scratch_dir
from kvchunks.engine import SamplingParams
from kvchunks.engine.checkpoint import resolve_model
from kvchunks.service.context_manager import ContextManager

DOCUMENT = " ".join(
    f"Entry {i}: the {w} of the old harbour was repaired in {1900 + 7 * i}."
    for i, w in enumerate(["crane", "pier", "lighthouse", "warehouse", "bridge", "gate"] * 6)
)
SMOKE = {"repeats": 2, "route_seconds": 1.0, "long_copies": 1}
LEAVE_AFTER_S = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, home: str) -> tuple[subprocess.Popen, str]:
    """`kvchunks http` in a process of its own, as a user runs it (a client in the same
    process would share its interpreter lock with the server)."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "kvchunks"),
        *("--data-dir", home, "--model", model, "http", "--port", str(port)),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kvchunks http did not start (exit {server.poll()})")
        time.sleep(0.2)


def ttft_in_process(cm: ContextManager, question: str, params: SamplingParams) -> float:
    first: list[float] = []
    start = time.perf_counter()
    cm.chat(
        [{"role": "user", "content": question}],
        params,
        on_text=lambda _: first or first.append(time.perf_counter()),
        store=False,
    )
    return first[0] - start


def ttft_http(client: openai.OpenAI, question: str, max_tokens: int) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model="kvchunks",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        extra_body={"context": "bench-http", "store": False},
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    return (first or time.perf_counter()) - start


def leave_during_prefill(url: str, message: str) -> None:
    """Send a chat request and go away LEAVE_AFTER_S later, before its first token (the
    server sends its headers with the first piece)."""
    body = {
        "messages": [{"role": "user", "content": message}],
        "max_tokens": 64,
        "stream": True,
        "context": "bench-http",
        "store": False,
    }
    timeout = httpx.Timeout(30, read=LEAVE_AFTER_S)
    try:
        with (
            httpx.Client(base_url=url, timeout=timeout) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            response.read()
    except httpx.ReadTimeout:
        return
    raise RuntimeError("the long prefill ended before the client left: raise --long-copies")


def rate(call, seconds: float) -> float:
    """Calls per second over `seconds` (after one warm-up call)."""
    call()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="TTFT runs of each (median)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--route-seconds", type=float, default=5.0, help="per route rate")
    parser.add_argument("--long-copies", type=int, default=3, help="the long message's size")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    model, home = str(resolve_model(None)), str(scratch_dir("bench-http"))
    server, url = start_server(model, home)
    # The in-process API: the same data directory (chunk records, the context's active
    # chunks), its own engine, idle while the server works and the other way round.
    cm = ContextManager(model, context="bench-http", home=home)
    try:
        doc = cm.add_chunk(DOCUMENT)
        cm.activate_chunk(doc.hash)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        ttft_in_process(cm, "Warm-up: which entry is first?", params)
        ttft_http(client, "Warm-up: which entry is last?", args.max_tokens)
        ours, theirs = [], []
        for i in range(args.repeats):  # in turn, so that drift hits both alike
            theirs.append(ttft_in_process(cm, f"When was entry {i} repaired?", params))
            ours.append(ttft_http(client, f"When was entry {i} repaired?", args.max_tokens))
        long_ttft, after_leaving = [], []
        for i in range(args.repeats):
            long_message = f"Note {i}. " + " ".join([DOCUMENT] * args.long_copies)
            long_ttft.append(ttft_http(client, long_message, 1))
            leave_during_prefill(url, f"Other note {i}. " + long_message)
            after_leaving.append(ttft_http(client, f"Which entry is {i}?", args.max_tokens))
        long_tokens = len(cm.store.model.chat.prompt(long_message))
        with httpx.Client(base_url=url) as http:
            get_rps = rate(
                lambda: http.get(f"/v1/chunks/{doc.hash}").raise_for_status(), args.route_seconds
            )
            other = cm.with_context("bench-http-toggle")

            def toggle_http() -> None:
                http.post("/v1/contexts/bench-http-toggle/activate", json={"chunk": doc.hash})
                http.post("/v1/contexts/bench-http-toggle/deactivate", json={"chunk": doc.hash})

            def toggle_api() -> None:
                other.activate_chunk(doc.hash)
                other.deactivate_chunk(doc.hash)

            toggle_rps = 2 * rate(toggle_http, args.route_seconds)
            api_get_rps = rate(lambda: cm.get_chunk(doc.hash), args.route_seconds)
            api_toggle_rps = 2 * rate(toggle_api, args.route_seconds)
    finally:
        server.terminate()
        server.wait()
        cm.close()
    http_ttft, api_ttft = statistics.median(ours), statistics.median(theirs)
    result = {
        "bench": "http_api",
        "context_tokens": doc.token_count,
        "http_ttft_s": round(http_ttft, 4),
        "api_ttft_s": round(api_ttft, 4),
        "http_ttft_ratio": round(http_ttft / api_ttft, 3),
        "http_ttft_ratio_goal": 1.10,
        "get_chunk_rps": round(get_rps, 1),
        "api_get_chunk_rps": round(api_get_rps, 1),
        "toggle_rps": round(toggle_rps, 1),
        "api_toggle_rps": round(api_toggle_rps, 1),
        "long_message_tokens": long_tokens,
        "long_ttft_s": round(statistics.median(long_ttft), 4),
        "ttft_after_leaving_s": round(statistics.median(after_leaving), 4),
        "left_prefill_cost_s": round(statistics.median(after_leaving) - http_ttft, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
