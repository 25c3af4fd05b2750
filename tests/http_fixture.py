"""The HTTP server, for real: uvicorn on a free loopback port over a chunk store whose registry
is a standalone Redis (so that a test can stop it), with an API key. One server serves the
session (the `served` fixture in conftest.py); the in-process API on the same store is the
oracle."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import uvicorn
from ports import free_port
from test_store_redis_url import StandaloneRedis

from kvchunks.engine import LLM, EngineConfig
from kvchunks.server.app import create_app
from kvchunks.server.backend import LocalBackend
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager

KEY = "test-key-0123"


@dataclass
class Served:
    url: str
    cm: ContextManager  # the in-process API over the server's store
    redis: StandaloneRedis

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0)


@contextmanager
def serve(model_path: Path, llm: LLM, home: Path) -> Iterator[Served]:
    (home / "redis").mkdir()
    redis_server = StandaloneRedis(home / "redis", free_port())
    redis_server.start()
    engine = LLM(model_path, EngineConfig(kv_cache_bytes=256 << 20))
    engine.runner.model = llm.runner.model  # the session's weights, a pool of its own
    store = ChunkStore(home=home, llm=engine, redis_url=redis_server.url)
    cm = ContextManager(store=store)
    port = free_port()
    config = uvicorn.Config(
        create_app(LocalBackend(cm), KEY), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the HTTP server did not start"
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{port}", cm, redis_server)
    finally:
        server.should_exit = True
        thread.join(30)
        store.close()
        if redis_server.process.poll() is None:
            redis_server.process.terminate()
            redis_server.process.wait()
