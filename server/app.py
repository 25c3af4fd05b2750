"""The HTTP server: an ASGI app (FastAPI) with the OpenAI endpoints, the chunk REST API,
health and Prometheus metrics, over a backend (the in-process API or the Ray cluster)."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvchunks.common import KVChunksError
from kvchunks.server import chunk_routes, errors, openai_routes
from kvchunks.server.backend import Backend
from kvchunks.server.metrics import Metrics

MAX_BODY_BYTES = 8 << 20  # a request larger than this is refused (413) before it is read
# Generations run at once; more wait their turn. Each holds its prompt's and answer's KV
# blocks while it runs, so a pool full of running generations refuses new KV (507) instead.
MAX_GENERATIONS = 8
OPEN_PATHS = ("/health",)  # served without the API key


def create_app(
    backend: Backend, api_key: str | None = None, max_generations: int = MAX_GENERATIONS
) -> FastAPI:
    app = FastAPI(title="kvchunks", summary="OpenAI-compatible serving over KV-cache chunks")
    app.state.backend = backend
    app.state.generation_slots = asyncio.Semaphore(max_generations)
    app.state.metrics = Metrics(backend.usage)
    app.add_exception_handler(KVChunksError, errors.on_kvchunks_error)
    app.add_exception_handler(errors.HTTPProblem, errors.on_problem)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)
    app.include_router(openai_routes.router)
    app.include_router(chunk_routes.router)

    app.add_middleware(Guard, api_key=api_key, metrics=app.state.metrics)

    @app.get("/health")
    def health() -> dict:
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

        refused = _refusal(Request(scope), self.api_key)
        await (refused or self.app)(scope, receive, counted)
        route = scope.get("route")
        path = route.path if route is not None else "unmatched"
        self.metrics.requests.labels(path, str(status["code"])).inc()


def _refusal(request: Request, api_key: str | None) -> JSONResponse | None:
    if api_key and request.url.path not in OPEN_PATHS:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            message = "missing or wrong API key: send Authorization: Bearer <key>"
            return JSONResponse(errors.body(message, "authentication_error", 401), 401)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        message = f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}"
        return JSONResponse(errors.body(message, "request_too_large", 413), 413)
    return None
