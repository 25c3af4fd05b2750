"""Chat-template framing of single turns, so that chunks concatenate into exactly the text
the model's chat template would render for the whole conversation."""

from __future__ import annotations

from functools import cached_property

from kvchunks.common import InvalidInput
from kvchunks.vocabulary import ROLES, check_unicode

_ANCHOR = [{"role": "system", "content": "\x00"}]


class ChatFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _turn_text(self, role: str, content: str) -> str:
        """One turn as the template renders it in the middle of a conversation.

        Rendered after a fixed system turn and cut off from it, because many templates add
        a default system prompt (or a BOS) before a conversation's first message.
        """
        if role == "system":
            return self._render([{"role": "system", "content": content}])
        anchor = self._render(_ANCHOR)
        full = self._render([*_ANCHOR, {"role": role, "content": content}])
        if not full.startswith(anchor):
            raise InvalidInput("this chat template cannot frame single turns; use role='raw'")
        return full[len(anchor) :]

    def frame(self, role: str, content: str) -> list[int]:
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        check_unicode(content)
        if role == "raw" or not self.has_template:
            return self._tokens(content)
        return self._tokens(self._turn_text(role, content))

    def prompt(self, content: str) -> list[int]:
        """A user turn followed by the assistant header the answer is generated after."""
        return self.frame("user", content) + self.generation_prompt

    @cached_property
    def opening(self) -> list[int]:
        """What the model reads before a context's first chunk: a system turn with nothing in
        it, as the chat template renders one, or without a template the tokenizer's own
        leading special tokens (a BOS). Every context starts with it.

        A chunk computed right at position 0 makes its own first tokens the sink every later
        token leans on; computed after the opening, chunks loaded apart lean on the same
        start, and so compose as one text does (bench/fidelity.py). The template's default
        system prompt served as well for composing, but it is a persona (SmolLM2's names
        itself) and changed answers; an empty turn did not.
        """
        if not self.has_template:
            plain = self._tokens("x")
            framed = self.tokenizer.encode("x")
            return framed[: framed.index(plain[0])] if plain[0] in framed else []
        return self.frame("system", "")

    @cached_property
    def generation_prompt(self) -> list[int]:
        if not self.has_template:
            return []
        plain = self._render(_ANCHOR)
        return self._tokens(self._render(_ANCHOR, generation_prompt=True)[len(plain) :])

    @cached_property
    def turn_end(self) -> list[int]:
        """What closes an assistant turn after its content (e.g. `<|im_end|>` and a newline)."""
        if not self.has_template:
            return []
        marker = "\x01"
        header = self._render(_ANCHOR, generation_prompt=True)
        turn = self._render([*_ANCHOR, {"role": "assistant", "content": marker}])
        return self._tokens(turn[len(header) :].split(marker, 1)[1])

    def close_answer(self, answer: list[int]) -> list[int]:
        """Tokens to append so the answer ends the way the template ends an assistant turn."""
        end = self.turn_end
        for overlap in range(min(len(end), len(answer)), 0, -1):
            if answer[-overlap:] == end[:overlap]:
                return end[overlap:]
        return end
