"""Request bodies: the OpenAI fields kvchunks serves, and its chunk extensions (the extra
top-level fields that the openai package sends with `extra_body`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)


class ChunkFields(BaseModel):
    """The kvchunks extensions of a generation request."""

    context: str = "default"
    chunks: list[str] = Field(default_factory=list)  # used for this request only, in order
    mode: Literal["exact", "reuse", "realign"] | None = None
    recompute: StrictFloat | None = None
    store: StrictBool = True  # False: nothing of the request is kept
    # Names the request while it runs, for POST /v1/requests/{request_id}/stop.
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")

    @field_validator("store", mode="before")
    @classmethod
    def _null_is_unset(cls, value: object) -> object:  # as OpenAI's fields are
        return True if value is None else value


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = None


# OpenAI fields, and vLLM's extensions, that change what an answer is, which kvchunks does not
# serve, and the values that ask for nothing (besides None, False, 0 and empty ones, which
# clients send unset).
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
    "min_tokens": (),
    "min_p": (),
    "use_beam_search": (),
    "length_penalty": (1,),
    "include_stop_str_in_output": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    # vLLM's, at the values that ask for what kvchunks does anyway.
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "add_generation_prompt": (True,),
    "modalities": (["text"],),
}


# OpenAI fields that do not change what the answer is: accepted, and not used. Any other
# field a generation request does not know is refused unless unset (null, false, empty): a
# mistyped extension ("chunk" for "chunks") would otherwise answer without what it asked for.
UNUSED = frozenset(
    {
        "user",
        "metadata",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)


class Sampling(ChunkFields):
    # Extra fields kept, to refuse the UNSERVED and unknown ones; NaN named as not finite,
    # not as out of a range.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    # Every field may be null, as OpenAI's are: null means the default (SamplingParams').
    # Strict: true is not 1 token, nor temperature 1, nor seed 1.
    model: str | None = None
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    # Their ranges are SamplingParams' (a bad value is a 400 with its message).
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    # Extensions, as in vLLM.
    repetition_penalty: StrictFloat | None = None
    top_k: StrictInt | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = None
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


class ChunkSelection(Body):
    """One chunk (`chunk`), or several, all or none (`chunks`, in order)."""

    chunk: str | None = None
    chunks: list[str] | None = None

    @model_validator(mode="after")
    def _one_of_them(self) -> ChunkSelection:
        if (self.chunk is None) == (self.chunks is None):
            raise ValueError("give either 'chunk' (one hash) or 'chunks' (a list of hashes)")
        return self


class Order(Body):
    chunks: list[str]  # every active chunk of the context, in its new order


class Settings(Body):
    mode: Literal["exact", "reuse", "realign"] | None = None
    recompute: StrictFloat | None = None
    auto_activate: StrictBool | None = None
    output_tokens: StrictInt | Literal["manual"] | None = None
