"""kvchunks errors as OpenAI-style JSON bodies with the HTTP status each one means."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvchunks.common import (
    AmbiguousHash,
    CapacityError,
    ChunkFileError,
    ChunkInUse,
    ChunkNotFound,
    ConcurrentChange,
    ContextWindowExceeded,
    DtypeMismatch,
    InvalidInput,
    KVChunksError,
    RegistryUnavailable,
    ServiceUnavailable,
)

# Most specific first: the first class an error is an instance of decides.
STATUS: list[tuple[type[BaseException], int, str]] = [
    (ChunkNotFound, 404, "not_found_error"),
    (AmbiguousHash, 409, "conflict_error"),
    (ChunkInUse, 409, "conflict_error"),
    (DtypeMismatch, 409, "conflict_error"),
    (ConcurrentChange, 409, "conflict_error"),
    (ContextWindowExceeded, 413, "context_length_exceeded"),
    (RegistryUnavailable, 503, "service_unavailable"),
    (ServiceUnavailable, 503, "service_unavailable"),
    (CapacityError, 507, "insufficient_storage"),
    (ChunkFileError, 500, "server_error"),
    (InvalidInput, 400, "invalid_request_error"),
]


class HTTPProblem(Exception):
    """An error the HTTP layer itself finds (a key, a size limit), with its status."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def body(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def status_of(error: BaseException) -> tuple[int, str]:
    for cls, status, kind in STATUS:
        if isinstance(error, cls):
            return status, kind
    return 500, "server_error"


def as_response(error: BaseException) -> JSONResponse:
    status, kind = status_of(error)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return JSONResponse(body(message, kind, status), status_code=status)


async def on_kvchunks_error(request: Request, error: KVChunksError) -> JSONResponse:
    return as_response(error)


async def on_problem(request: Request, error: HTTPProblem) -> JSONResponse:
    return JSONResponse(body(str(error), error.kind, error.status), status_code=error.status)


async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
    return JSONResponse(body(message, "invalid_request_error", 400), status_code=400)
