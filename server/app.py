"""The HTTP server: an ASGI app (FastAPI) with the OpenAI endpoints, the chunk REST API,
health and Prometheus metrics, over a backend (the in-process API or the Ray cluster)."""

from __future__ import annotations

import asyncio
import hmac
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvchunks.common import KVChunksError
from kvchunks.server import chunk_routes, errors, openai_routes
from kvchunks.server.backend import Backend
from kvchunks.server.metrics import Metrics
from kvchunks.server.streaming import RunningRequests

MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413)
# Generations run at once; more wait their turn. Each holds its prompt's and answer's KV
# blocks while it runs, so a pool full of running generations refuses new KV (507) instead.
MAX_GENERATIONS = 8
# Served without the API key: health, and the web page with its scripts and styles. The page
# holds no data of its own; it asks for the key, keeps it in the browser (localStorage) and
# sends it as `Authorization: Bearer` with every API call, so the key still guards all data.
OPEN_PATHS = ("/health", "/", "/ui")
OPEN_PREFIXES = ("/ui/",)
UI_DIR = Path(__file__).parent / "ui"


def create_app(backend: Backend, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kvchunks", summary="OpenAI-compatible serving over KV-cache chunks")
    app.state.backend = backend
    app.state.started = int(time.time())  # the model card's `created`
    app.state.generation_slots = asyncio.Semaphore(MAX_GENERATIONS)
    app.state.metrics = Metrics(backend.usage)
    app.state.running = RunningRequests()
    app.add_exception_handler(KVChunksError, errors.on_kvchunks_error)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)
    app.add_exception_handler(HTTPException, errors.on_http_exception)
    app.add_exception_handler(Exception, errors.on_unexpected_error)
    app.include_router(openai_routes.router)
    app.include_router(chunk_routes.router)

    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

    app.add_middleware(Guard, api_key=api_key, metrics=app.state.metrics)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/")

    # Up means the registry answers: without it every data route is a 503, and a load
    # balancer should send the requests elsewhere. HEAD too, as some health checkers send it.
    @app.get("/health")
    @app.head("/health", include_in_schema=False)  # one operation in the OpenAPI schema
    def health() -> dict:
        backend.contexts()  # the registry unreachable: a 503 with the reason (errors.py)
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class Guard:
    """The API key, the size limit, and a count of every request by route and status.

    Plain ASGI rather than `@app.middleware("http")`, which passes every streamed event
    through a queue and a task switch of its own."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refused = _refusal(Request(scope), self.api_key)
            await (refused or self.app)(scope, _limited(receive), counted)
        finally:
            self.metrics.requests.labels(_route(scope), str(status["code"])).inc()


def _limited(receive: Receive) -> Receive:
    """`receive` that refuses a body over the limit as it arrives: a body sent in chunks
    has no Content-Length to check beforehand."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > MAX_BODY_BYTES:
            raise HTTPException(413, _too_large(f"more than {MAX_BODY_BYTES} bytes"))
        return message

    return limited


def _too_large(size: str) -> str:
    return f"request body of {size} is over the limit of {MAX_BODY_BYTES} bytes"


def _route(scope: Scope) -> str:
    """The route's path; the page's files count as one route."""
    route = scope.get("route")
    if route is not None:
        return route.path
    return "/ui" if scope["path"] == "/ui" or scope["path"].startswith("/ui/") else "unmatched"


def _refusal(request: Request, api_key: str | None) -> JSONResponse | None:
    path = request.url.path
    if api_key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # The scheme's name is case-insensitive (RFC 9110); the key is not.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
            message = "missing or wrong API key: send Authorization: Bearer <key>"
            # RFC 6750: a 401 names the scheme the client should use.
            return errors.http_error(401, message, {"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return errors.http_error(413, _too_large(f"{length} bytes"))
    return None
