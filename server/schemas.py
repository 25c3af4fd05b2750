"""Request bodies: the OpenAI fields kvchunks serves, and its chunk extensions (the extra
top-level fields that the openai package sends with `extra_body`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChunkFields(BaseModel):
    """The kvchunks extensions of a generation request."""

    model_config = ConfigDict(extra="ignore")  # OpenAI fields kvchunks does not use

    context: str = "default"
    chunks: list[str] = Field(default_factory=list)  # used for this request only, in order
    mode: Literal["exact", "reuse", "realign"] | None = None
    recompute: float | None = None
    store: bool = True  # False: nothing of the request is kept


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields that change what an answer is, which kvchunks does not serve, and the values
# that ask for nothing (besides None, False, 0 and empty ones, which clients send unset).
# A request that sets one otherwise is refused: answering as if it were absent would hand
# the client something other than what it asked for.
UNSERVED: dict[str, tuple] = {
    "logprobs": (),
    "top_logprobs": (),
    "logit_bias": (),
    "tools": (),
    "functions": (),
    "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "echo": (),
    "suffix": (),
    "best_of": (1,),
}


class Sampling(ChunkFields):
    model_config = ConfigDict(extra="allow")  # kept, to refuse the UNSERVED ones

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    # Their ranges are SamplingParams' (a bad value is a 400 with its message).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # an extension, as in vLLM
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[dict[str, Any]]


class CompletionRequest(Sampling):
    prompt: str | list[str]


class NewChunk(BaseModel):
    text: str
    role: Literal["system", "user", "assistant", "raw"] = "system"
    tags: list[str] = Field(default_factory=list)
    source: str | None = Field(None, min_length=1, max_length=200)  # a name, kept in metadata


class Tags(BaseModel):
    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class Move(BaseModel):
    tier: Literal["gpu", "cpu", "disk"]


class Compose(BaseModel):
    chunks: list[str]
    tags: list[str] = Field(default_factory=list)


class Split(BaseModel):
    at: int


class ChunkRef(BaseModel):
    chunk: str


class Order(BaseModel):
    chunks: list[str]  # every active chunk of the context, in its new order


class Settings(BaseModel):
    mode: Literal["exact", "reuse", "realign"] | None = None
    recompute: float | None = None
    auto_activate: bool | None = None
