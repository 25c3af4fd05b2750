"""Cutting a text into parts of at most N tokens at natural boundaries, for a file longer
than the context window: whole paragraphs where they fit, else whole sentences, else words,
else characters. A cut never falls inside a character, and the parts put back together are
the text exactly (each separator stays at the end of the part before it)."""

from __future__ import annotations

import re
from collections.abc import Callable

# Each boundary ends a piece: its separator (and the whitespace after it) stays with that piece.
BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),  # a blank line: paragraphs
    re.compile(r"[.!?…]+[\"'”’)\]]*\s+|[。！？]+\s*"),  # sentence ends
    re.compile(r"\s+"),  # words
)

CountTokens = Callable[[str], int]


def split_text(text: str, max_tokens: int, count_tokens: CountTokens) -> list[str]:
    """Consecutive parts of `text`, each `count_tokens(part) <= max_tokens`, cut at the
    coarsest boundary that allows it. The one exception: a part holds at least one
    character, even where that character alone takes more than `max_tokens` tokens."""
    return _pack(text, max_tokens, count_tokens, level=0)


def _pack(text: str, limit: int, count: CountTokens, level: int) -> list[str]:
    """Pieces between boundaries of `level`, joined while they fit; a piece too long alone
    is cut at the next, finer level."""
    if count(text) <= limit:
        return [text]
    if level == len(BOUNDARIES):
        return _cut_characters(text, limit, count)
    parts: list[str] = []
    current = ""
    for piece in _pieces(text, BOUNDARIES[level]):
        if current and count(current + piece) <= limit:
            current += piece
            continue
        if current:
            parts.append(current)
        current = piece if count(piece) <= limit else ""
        if not current:
            parts += _pack(piece, limit, count, level + 1)
    if current:
        parts.append(current)
    return parts


def _pieces(text: str, boundary: re.Pattern[str]) -> list[str]:
    """`text` cut after each boundary that has words on both sides (so no piece is only
    whitespace, and leading or trailing whitespace stays with its neighbour)."""
    pieces, start = [], 0
    for match in boundary.finditer(text):
        if text[start : match.start()].strip() and match.end() < len(text):
            pieces.append(text[start : match.end()])
            start = match.end()
    pieces.append(text[start:])
    return pieces


def _cut_characters(text: str, limit: int, count: CountTokens) -> list[str]:
    """Parts of the longest run of whole characters that fits, each with some non-space."""
    parts = []
    while count(text) > limit:
        words = text.strip()
        first = len(text) - len(text.lstrip())  # cuts leave words on both sides
        last = first + len(words) - 1
        if first + 1 > last:
            break  # one character with whitespace around it: it cannot be cut
        cut = _longest_fitting(text, first + 1, last, limit, count)
        parts.append(text[:cut])
        text = text[cut:]
    return [*parts, text]


def _longest_fitting(text: str, low: int, high: int, limit: int, count: CountTokens) -> int:
    """The largest cut in [low, high] whose head fits in `limit` tokens (at least `low`).
    Token counts grow with the head, so a binary search finds it."""
    while low < high:
        middle = (low + high + 1) // 2
        if count(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    return low
