"""The OpenAI endpoints: models, chat completions and completions, streamed or not.

A chat request's messages become chunks (ContextManager.chat); a completion's prompt is one
user message. The chunk extensions (context, chunks, mode, recompute, store) come as extra
top-level fields, and the response says what kvchunks did in a `kvchunks` object.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvchunks import GenerationResult, SamplingParams
from kvchunks.common import InvalidInput
from kvchunks.server.errors import as_response, http_error
from kvchunks.server.schemas import (
    UNSERVED,
    UNUSED,
    ChatRequest,
    ChunkFields,
    CompletionRequest,
    Sampling,
)
from kvchunks.server.streaming import stream_call

router = APIRouter()

CHAT_MAX_TOKENS = 512  # when a chat request names none (OpenAI: up to the model's window)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions


@router.get("/v1/models")
def models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/v1/models/{model:path}")
def model(model: str, request: Request) -> Response:
    card = _model_card(request)
    if model != card["id"]:
        return http_error(404, f"no model {model!r}; this server serves {card['id']!r}")
    return JSONResponse(card)


def _model_card(request: Request) -> dict:
    name, created = request.app.state.backend.model_name, request.app.state.started
    return {"id": name, "object": "model", "created": created, "owned_by": "kvchunks"}


@router.post("/v1/requests/{request_id}/stop")
async def stop_request(request_id: str, request: Request) -> dict:
    """Stop a running generation named by its `request_id`, as a Ctrl-C stops one: its
    response ends with the answer so far, kept and marked interrupted (before the first
    token, a 499 error: nothing kept). The response says what was kept, not this."""
    request.app.state.running.stop(request_id)
    return {"request_id": request_id, "stopping": True}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    return await _respond(request, body, body.messages, "chat.completion", CHAT_MAX_TOKENS)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidInput("prompt must be one string (batches of prompts are not served)")
    if not prompts[0].strip():
        raise InvalidInput("prompt must be non-empty text")
    logprobs = (body.model_extra or {}).get("logprobs")
    if logprobs is not None and logprobs is not False:  # 0 asks for the chosen tokens'
        raise InvalidInput("logprobs is not served by kvchunks; leave it out")
    messages = [{"role": "user", "content": prompts[0]}]
    return await _respond(request, body, messages, "text_completion", COMPLETION_MAX_TOKENS)


def _sampling(body: Sampling, default_max_tokens: int) -> SamplingParams:
    if body.n not in (None, 1):
        raise InvalidInput("n must be 1")
    if body.stream_options and body.stream_options.include_usage and not body.stream:
        raise InvalidInput("stream_options is for streamed answers: set stream, or leave it out")
    for name, value in (body.model_extra or {}).items():
        if name in UNUSED or _asks_nothing(name, value):
            continue
        if name in UNSERVED:
            raise InvalidInput(f"{name} is not served by kvchunks; leave it out")
        own = ", ".join(ChunkFields.model_fields)
        raise InvalidInput(f"unknown field {name!r} (kvchunks' own are {own})")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    given = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "top_k": body.top_k,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
    }
    return SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
        seed=body.seed,
        stop=stop,
        **{name: value for name, value in given.items() if value is not None},
    )


def _asks_nothing(name: str, value: object) -> bool:
    """Null; a value UNSERVED lists as asking for what kvchunks does anyway; else false, 0
    or empty, which clients send for a field they leave unset."""
    if value is None:
        return True
    if UNSERVED.get(name):
        return value in UNSERVED[name]
    return not value


async def _respond(
    request: Request, body: Sampling, messages: list, kind: str, default_max_tokens: int
) -> Response:
    state = request.app.state
    params = _sampling(body, default_max_tokens)
    manager = state.backend.made(body.context)
    if manager is None:  # made once per context, which may ask Ray: not on the event loop
        manager = await run_in_threadpool(state.backend.manager, body.context)
    call = {
        "messages": messages,
        "params": params,
        "mode": body.mode,
        "recompute": body.recompute,
        "chunks": body.chunks,
        "store": body.store,
    }
    reply = Reply(kind, state.backend.model_name, body)
    stop = state.running.start(body.request_id) if body.request_id else None
    events = stream_call(
        manager.chat, state.generation_slots, request.is_disconnected, stop=stop, **call
    )
    if body.request_id:
        events = state.running.until_closed(body.request_id, events)
    gone = Response(status_code=499)  # nobody left to answer (nginx's code)
    if not body.stream:
        async with contextlib.aclosing(events):  # closed: the generation stops at its next piece
            async for event, value in events:
                if event == "text" and await request.is_disconnected():
                    return gone
                if event == "error":
                    return as_response(value)
                if event == "result":
                    state.metrics.observe_generation(value, *reply.token_counts(value))
                    return JSONResponse(reply.whole(value))
        return gone  # it left while waiting for its turn
    # Streamed: headers go once the first piece (or an early refusal) is known, so that a
    # refused request still gets its status and JSON error.
    first = await anext(events, None)
    if first is None:
        return gone
    if first[0] == "error":
        await events.aclose()
        return as_response(first[1])
    return StreamingResponse(_sse(reply, first, events, state), media_type="text/event-stream")


async def _sse(reply: Reply, first, events: AsyncIterator, state) -> AsyncIterator[str]:
    """The answer as server-sent events. The engine never shows a stop string, so the text
    goes out as it comes."""
    # A chat answer opens with its role, sent with the first text: one write, not two.
    opening = _event(reply.chunk(role=True)) if reply.kind == "chat.completion" else ""
    pending = [first]
    while True:
        event, value = pending.pop() if pending else await anext(events)
        if event == "text":
            yield opening + _event(reply.chunk(text=value))
            opening = ""
            continue
        if opening:
            yield opening
        if event == "error":
            status = as_response(value)
            yield _event(json.loads(status.body))
        else:
            state.metrics.observe_generation(value, *reply.token_counts(value))
            yield _event(reply.chunk(finish=value))
            if reply.include_usage:
                yield _event(reply.usage_chunk(value))
        yield "data: [DONE]\n\n"
        return


def _event(document: dict) -> str:
    return f"data: {json.dumps(document, ensure_ascii=False)}\n\n"


class Reply:
    """The OpenAI response objects of one request."""

    def __init__(self, kind: str, model: str, body: Sampling):
        self.kind, self.model, self.body = kind, model, body
        self.id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        options = body.stream_options
        self.include_usage = bool(options and options.include_usage)

    def whole(self, result: GenerationResult) -> dict:
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None}
        choice["finish_reason"] = self.finish_reason(result)
        return {
            **self._head(self.kind),
            "choices": [choice],
            "usage": self.usage(result),
            "kvchunks": self.extension(result),
        }

    def chunk(self, text: str = "", role: bool = False, finish=None) -> dict:
        if self.kind == "chat.completion":
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            if finish is not None:
                delta = {}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = None if finish is None else self.finish_reason(finish)
        document = {**self._head(self._chunk_kind()), "choices": [choice]}
        if finish is not None:
            document["kvchunks"] = self.extension(finish)
        return document

    def usage_chunk(self, result: GenerationResult) -> dict:
        return {**self._head(self._chunk_kind()), "choices": [], "usage": self.usage(result)}

    def token_counts(self, result: GenerationResult) -> tuple[int, int]:
        """Prompt tokens (the context attended to, then the prompt) and those of them whose
        KV was used as stored: OpenAI's `cached_tokens`."""
        prompt = result.prompt_chunk.token_count
        context = result.tokens_reused + result.tokens_recomputed
        cached = result.tokens_reused + (prompt - 1 if result.prompt_reused else 0)
        return context + prompt, cached

    def usage(self, result: GenerationResult) -> dict:
        prompt, cached = self.token_counts(result)
        completion = len(result.token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def extension(self, result: GenerationResult) -> dict:
        kept = self.body.store
        return {
            "context": self.body.context,
            "prompt_chunk": result.prompt_chunk.hash if kept else None,
            "output_chunk": result.output_chunk.hash if kept and result.output_chunk else None,
            # More than one when the context stores an answer in parts (output_tokens).
            "output_chunks": [c.hash for c in result.output_chunks] if kept else [],
            "mode": result.mode,
            "recompute": result.recompute,
            "interrupted": result.interrupted,  # stopped by POST /v1/requests/{id}/stop
            "reused_tokens": result.tokens_reused,
            "recomputed_tokens": result.tokens_recomputed,
        }

    def finish_reason(self, result: GenerationResult) -> str:
        return "length" if result.finish_reason == "length" else "stop"

    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}
