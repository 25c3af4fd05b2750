"""A conversation sent whole with every request, as OpenAI clients send it, kept as chunks.

Each message but the last becomes a chunk computed after what precedes it (the chunks the
request attends to first, then the earlier messages), so a client that resends a growing
conversation computes only what is new: the messages it sent before are the same chunks
again (content addresses), and an assistant message that repeats a stored answer is that
answer's chunk. The last message, from the user, is the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvchunks.common import InvalidInput
from kvchunks.engine.chat import ChatFormat
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.chunks import Hold
from kvchunks.service.generation import Call
from kvchunks.store.chunk import ChunkInfo

# A message's role -> the role of its chunk. "developer" is OpenAI's newer name for the
# system message, which its clients send for newer models.
MESSAGE_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


@dataclass
class Message:
    role: str
    content: str


def checked_messages(messages: list) -> list[Message]:
    """Messages as {"role", "content"} dicts (content: text, or a list of text parts)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            raise InvalidInput(f"messages[{i}].role must be one of {', '.join(MESSAGE_ROLES)}")
        if isinstance(content, list):  # OpenAI content parts: text ones only
            content = _joined_text_parts(content, i)
        if not isinstance(content, str) or not content.strip():
            raise InvalidInput(f"messages[{i}].content must be non-empty text")
        out.append(Message(MESSAGE_ROLES[role], content))
    if out[-1].role != "user":
        raise InvalidInput("the last message must be the user's (the prompt)")
    return out


def _joined_text_parts(parts: list, i: int) -> str:
    """The text of message i's content parts; any other kind of part (an image, audio) is
    refused: the answer would be made without it."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise InvalidInput(
                f"messages[{i}].content: only text parts are served, not {kind or 'this part'!r}"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidInput(f"messages[{i}].content: a text part's text must be text")
        texts.append(part["text"])
    return "".join(texts)


def message_tokens(chat: ChatFormat, messages: list[Message]) -> list[list[int]]:
    """The tokens each of messages[:-1] is as a chunk: an answer as the model ends one, a
    prompt as a generation's prompt chunk is, any other message framed as its role's turn."""
    tokens = []
    for i, message in enumerate(messages[:-1]):
        if _is_answer(messages, i):
            body = chat.tokenizer.encode(message.content, add_special_tokens=False)
            tokens.append(body + chat.close_answer(body))
        elif message.role == "user" and messages[i + 1].role == "assistant":
            tokens.append(chat.prompt(message.content))
        else:
            tokens.append(chat.frame(message.role, message.content))
    return tokens


def held_context(
    store: ChunkStore, context: str, hold: Hold, refs: list[str]
) -> tuple[list[ChunkInfo], list[ChunkInfo]]:
    """What a call reads: the context's active chunks, and those with the request's chunks
    (`refs`, a chat's) after them (each attended to once: one already active, or named
    twice, is not read again). Held by the call, with the chunks they were computed after,
    so that a take-back elsewhere of one of them (a chunk a call made just now) waits for
    it and goes after what it computes; read again once held, as a take-back may have
    come first."""
    registry = store.registry
    named = [registry.find(ref).hash for ref in refs]
    active = registry.active(context)
    hashes = list(dict.fromkeys([*active, *named]))
    store.maker.hold(hold, hashes)
    before = registry.get_many(hashes)
    store.maker.hold_lineage(hold, before)
    return before[: len(active)], before


def message_chunks(
    store: ChunkStore,
    context: str,
    messages: list[Message],
    tokens: list[list[int]],
    before: list[ChunkInfo],
    call: Call,
    made: list[ChunkInfo],
    hold: Hold,
) -> list[ChunkInfo]:
    """The chunks of messages[:-1] (their `message_tokens`), each computed after `before`
    and the messages before it in the call's mode, or found stored: an answer that repeats
    a stored one is that chunk. Those computed now (not stored before) are appended to
    `made` as they are stored, so that a caller can take them back if this or what follows
    fails. The call holds each chunk, made or found."""
    out = []
    for i, (message, chunk_tokens) in enumerate(zip(messages[:-1], tokens, strict=True)):
        parents = [*before, *out]
        if _is_answer(messages, i):
            answer = _stored_answer(store, parents, message.content, hold)
            if answer is not None:
                out.append(answer)
                continue
        chunk, new = store.maker.compute(
            chunk_tokens,
            parents,
            call.mode,
            call.recompute,
            hold,
            role=message.role,
            kind="input",
            text=message.content,
            metadata={"source": "message", "context": context},
        )
        out.append(chunk)
        if new:
            made.append(chunk)
    return out


def _is_answer(messages: list[Message], i: int) -> bool:
    """Whether messages[i] is the model's answer to the prompt right before it."""
    return messages[i].role == "assistant" and i > 0 and messages[i - 1].role == "user"


def _stored_answer(
    store: ChunkStore, parents: list[ChunkInfo], text: str, hold: Hold
) -> ChunkInfo | None:
    """The stored answer, computed after exactly `parents`, whose text is `text`; the call
    holds it."""
    registry = store.registry
    expected = [p.hash for p in parents]
    for child in registry.get_present(registry.children(parents[-1].hash)):
        if (
            child.kind == "output"
            and child.parent_chunks == expected
            and child.text.strip() == text.strip()
        ):
            store.maker.hold(hold, [child.hash])
            # held now: a take-back can no longer delete it, but may have done so before
            if registry.exists(child.hash):
                return child
    return None
