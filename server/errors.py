"""kvchunks errors as OpenAI-style JSON bodies with the HTTP status each one means."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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
from kvchunks.server.streaming import NoSuchRequest, RequestIdInUse, StoppedBeforeAnswer

_log = logging.getLogger("kvchunks.server")

# Most specific first: the first class an error is an instance of decides.
STATUS: list[tuple[type[BaseException], int, str]] = [
    (ChunkNotFound, 404, "not_found_error"),
    (NoSuchRequest, 404, "not_found_error"),
    (RequestIdInUse, 409, "conflict_error"),
    # The client asked for the stop and still listens: nginx's "client closed request".
    (StoppedBeforeAnswer, 499, "request_stopped"),
    (AmbiguousHash, 409, "conflict_error"),
    (ChunkInUse, 409, "conflict_error"),
    (DtypeMismatch, 409, "conflict_error"),
    (ConcurrentChange, 409, "conflict_error"),
    # 400, the status OpenAI and vLLM answer it with (clients look for an overflow there).
    (ContextWindowExceeded, 400, "context_length_exceeded"),
    (RegistryUnavailable, 503, "service_unavailable"),
    (ServiceUnavailable, 503, "service_unavailable"),
    (CapacityError, 507, "insufficient_storage"),
    (ChunkFileError, 500, "server_error"),
    (InvalidInput, 400, "invalid_request_error"),
]


def body(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def status_of(error: BaseException) -> tuple[int, str]:
    for cls, status, kind in STATUS:
        if isinstance(error, cls):
            return status, kind
    return 500, "server_error"


def as_response(error: BaseException) -> JSONResponse:
    """The response for an error raised where the app's handlers do not see it (in a
    generation's thread): a bug is logged with its traceback, as the handlers' are."""
    if not isinstance(error, KVChunksError):
        _log.error("unexpected error in a generation", exc_info=error)
        return _internal_error(error)
    status, kind = status_of(error)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return JSONResponse(body(message, kind, status), status_code=status)


async def on_kvchunks_error(request: Request, error: KVChunksError) -> JSONResponse:
    return as_response(error)


# What the HTTP layer itself refuses, OpenAI's error types for the statuses it uses.
HTTP_KINDS = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}


def http_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = HTTP_KINDS.get(status, "invalid_request_error")
    return JSONResponse(body(message, kind, status), status_code=status, headers=headers)


async def on_http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """An unknown route, a wrong method, a body over the limit: JSON like every error."""
    return http_error(error.status_code, str(error.detail), error.headers)


async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug: a JSON 500 for the client; the server logs its traceback (Starlette raises it
    again after this handler)."""
    return _internal_error(error)


def _internal_error(error: BaseException) -> JSONResponse:
    message = f"internal error ({type(error).__name__}); the server's log has the details"
    return JSONResponse(body(message, "server_error", 500), status_code=500)


async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """What is wrong with a request, in one line: the field and why, or the body itself."""
    first = _deepest_at_first_field(error.errors())
    where = [str(p) for p in first.get("loc", ()) if p != "body" and not _branch(p)]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "decode error")
        at = f" (at character {where[0]})" if where else ""
        message = f"the body is not valid JSON: {reason}{at}"
    elif where:
        message = f"{'.'.join(where)}: {first.get('msg', 'invalid')}"
    elif first.get("type") == "value_error":  # a rule over the whole body's fields
        message = first.get("msg", "invalid").removeprefix("Value error, ")
    else:  # curl -d, for one, sends a form's Content-Type, and the body arrives as bytes
        message = "the body must be a JSON object, sent with Content-Type: application/json"
    return JSONResponse(body(message, "invalid_request_error", 400), status_code=400)


def _deepest_at_first_field(errors: list[dict]) -> dict:
    """Of the errors at the first wrong field (a union gives one per type it allows), the one
    that reaches furthest in: `"stop": [5]` is wrong at stop.0, not for not being a string."""
    if not errors:
        return {}
    field = errors[0].get("loc", ())[:2]
    return max((e for e in errors if e.get("loc", ())[:2] == field), key=lambda e: len(e["loc"]))


def _branch(part: object) -> bool:
    """A union member's tag in an error's place (`str`, `list[str]`), not a field or index."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)
