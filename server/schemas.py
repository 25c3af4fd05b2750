"""Request bodies: the OpenAI fields kvchunks serves, and its chunk extensions (the extra
top-level fields that the openai package sends with `extra_body`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


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

    # Every field may be null, as OpenAI's are: null means the default (SamplingParams').
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # Strict: true is not 1 token, nor seed 1.
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    # Their ranges are SamplingParams' (a bad value is a 400 with its message).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # an extension, as in vLLM
    n: StrictInt | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[dict[str, Any]]


class CompletionRequest(Sampling):
    prompt: str | list[str]


class Body(BaseModel):
    """A chunk route's body: a field it does not know is refused, not ignored (a typo would
    otherwise answer 200 with nothing done)."""

    model_config = ConfigDict(extra="forbid")


class NewChunk(Body):
    text: str
    role: Literal["system", "user", "assistant", "raw"] = "system"
    tags: list[str] = Field(default_factory=list)
    source: str | None = Field(None, min_length=1, max_length=200)  # a name, kept in metadata


class Tags(Body):
    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class Move(Body):
    tier: Literal["gpu", "cpu", "disk"]


class Compose(Body):
    chunks: list[str]
    tags: list[str] = Field(default_factory=list)


class Split(Body):
    at: StrictInt  # true is not token 1


class ChunkRef(Body):
    chunk: str


class Order(Body):
    chunks: list[str]  # every active chunk of the context, in its new order


class Settings(Body):
    mode: Literal["exact", "reuse", "realign"] | None = None
    recompute: float | None = None
    auto_activate: bool | None = None
    output_tokens: StrictInt | Literal["manual"] | None = None
