"""Stop strings in streamed text: what can be shown before the answer is done."""

from __future__ import annotations


def stop_window(stops: list[str]) -> int:
    """How many of the newest tokens a stop string that has just appeared may span: one per
    UTF-8 byte at most (a byte-level tokenizer may spend a token on each byte of a
    character), and one more for a character split between the string and the token before."""
    return max(len(s.encode("utf-8")) for s in stops) + 1


def held_back(text: str, stops: list[str]) -> str:
    """`text` without its longest ending that may be the beginning of a stop string: that
    ending is shown only once the next tokens tell whether the stop string follows."""
    for cut in range(max(0, len(text) - max(map(len, stops), default=0)), len(text)):
        if any(stop.startswith(text[cut:]) for stop in stops):
            return text[:cut]
    return text
