from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kvchunks.common import InvalidInput
from kvchunks.vocabulary import check_flag, check_unicode, is_count, is_number

NUMBERS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# A temperature below this samples as greedy: float32 logits divided by much less overflow to
# infinity, and the distribution is one token's anyway (vLLM draws the line here too).
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token. temperature 0 (below GREEDY_BELOW) means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    # Generation ends once one of these strings appears in the answer's text; the answer
    # and its tokens end before it (a token the string starts inside is dropped).
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Hugging Face's rule, over every token the model sees (context, prompt and answer):
    # a positive logit is divided by it, a negative one multiplied. 1 is off.
    repetition_penalty: float = 1.0
    # OpenAI's rule, over the answer's tokens only: subtract presence x [count > 0] and
    # frequency x count. 0 is off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        self._check_types()
        if not 0 <= self.temperature < math.inf:
            raise InvalidInput(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidInput("stop must be a list of non-empty strings")
        for text in self.stop:
            check_unicode(text, "a stop string")
        if not 0 < self.repetition_penalty < math.inf:
            raise InvalidInput(
                f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}"
            )
        # What a torch generator takes: a 64-bit integer, signed or not.
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidInput(f"seed must be a 64-bit integer, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise InvalidInput(f"{name} must be between -2 and 2, got {value}")

    def _check_types(self) -> None:
        """Each field of its type, so that a wrong one is refused here rather than read
        loosely (2.5 tokens, a string that is true) or failing in the middle of a step."""
        for name in NUMBERS:
            if not is_number(getattr(self, name)):
                raise InvalidInput(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("max_tokens", "top_k"):
            if not is_count(getattr(self, name)):
                raise InvalidInput(f"{name} must be a whole number, got {getattr(self, name)!r}")
        if self.seed is not None and not is_count(self.seed):
            raise InvalidInput(f"seed must be a whole number or None, got {self.seed!r}")
        check_flag("ignore_eos", self.ignore_eos)
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(is_count(t) and t >= 0 for t in ids):
            raise InvalidInput("stop_token_ids must be a list of token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits."""
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )

    def to_dict(self) -> dict:
        return asdict(self)
