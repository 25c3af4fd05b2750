"""The product's vocabulary: the names of modes, roles, kinds, layouts, tiers and dtypes, the
checks of a user's choice among them, and the checks of the names and tags a user gives.

Plain Python that imports nothing heavy, so every layer (and the command line, before it
loads anything) names these things from one place.
"""

from __future__ import annotations

import re

from kvchunks.common import InvalidInput

ROLES = ("system", "user", "assistant", "raw")
KINDS = ("input", "output", "composed", "split")
# How a chunk's KV positions relate to other chunks:
#   standalone: computed with an empty context at `position`; can be re-placed anywhere
#               (realign mode) because nothing before it was attended.
#   timeline:   computed after its `parent_chunks`, at `position` in that sequence; valid as
#               stored only behind the same prefix (reuse mode), else realigned or recomputed.
#   view:       a composed or split chunk; it owns no KV and reads its `sources`' segments.
LAYOUTS = ("standalone", "timeline", "view")
TIERS = ("gpu", "cpu", "disk")  # nearest first: a view is as far as its furthest source
DTYPES = ("float32", "bfloat16", "float16")  # of the KV pool and KV files
DEFAULT_DTYPE = "float32"  # where none is given (the CLI's --dtype, KVCHUNKS_DTYPE)


def farthest_tier(tiers: list[str]) -> str:
    """The tier furthest from the engine among `tiers` (what a view over them waits for)."""
    return max(tiers, key=TIERS.index)


def nearest_tier(tiers: list[str]) -> str:
    return min(tiers, key=TIERS.index)


# The three ways of combining stored KV, and their settings.

MODES = ("exact", "reuse", "realign")
DEFAULT_MODE = "realign"
# The fraction of a composition's tokens that `realign` recomputes when none is given: on
# bench/fidelity.py's curve, past it the KL against `exact` falls slowly for the time to
# first token it costs (from 0.05 to 0.3 the answers are the same).
DEFAULT_RECOMPUTE = 0.15


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidInput(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def check_recompute(mode: str, recompute: float | None) -> float | None:
    """A recompute fraction is for `realign` only, and lies in [0, 1]."""
    if recompute is None:
        return None
    if mode != "realign":
        raise InvalidInput(
            f"a recompute fraction applies to realign only, not to {mode}; "
            "set the mode to realign, or leave the fraction out"
        )
    if not is_number(recompute):
        raise InvalidInput(f"recompute must be a number from 0 to 1, not {recompute!r}")
    if not 0 <= recompute <= 1:
        raise InvalidInput(f"recompute must be from 0 to 1 (a fraction of tokens), not {recompute}")
    return float(recompute)


def combination(mode: str, recompute: float | None = None) -> str:
    """The name of what a chunk computed in this mode attends to, part of its content
    address: "realign" alone is plain re-placement (nothing recomputed)."""
    check_mode(mode)
    check_recompute(mode, recompute)
    if mode != "realign":
        return mode
    fraction = recompute_fraction(mode, recompute)
    return f"realign:{fraction:g}" if fraction else "realign"


def recompute_fraction(mode: str, recompute: float | None) -> float | None:
    """The fraction of the active tokens that `realign` recomputes when asked for
    `recompute` (None: the default); None for the other modes."""
    if mode != "realign":
        return None
    return DEFAULT_RECOMPUTE if recompute is None else recompute


def recompute_of(combine: str) -> float:
    """The recompute fraction a combination name stands for."""
    _, _, fraction = combine.partition(":")
    return float(fraction) if fraction else 0.0


def split_combination(combine: str) -> tuple[str, float | None]:
    """(mode, recompute) back from a combination name ("" is one timeline: any mode)."""
    mode = combine.partition(":")[0] or "reuse"
    return mode, (recompute_of(combine) if mode == "realign" else None)


# Names a user gives: contexts and namespaces, and tags. Both become parts of Redis keys.

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_name(name: object, what: str = "context") -> str:
    """Context and namespace names: 1 to 64 letters, digits, '-', '_' or '.'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"invalid {what} name {name!r}: use 1 to 64 letters, digits, - _ .")
    return name


def check_tag(tag: object) -> str:
    """A tag is 1..64 printable characters without whitespace (it becomes part of a Redis key)."""
    if (
        not isinstance(tag, str)
        or not 1 <= len(tag) <= 64
        or not tag.isprintable()
        or any(c.isspace() for c in tag)
    ):
        raise InvalidInput(f"invalid tag {tag!r}: use 1 to 64 printable characters, no spaces")
    return tag


def checked_tags(tags: object) -> list[str]:
    """A list of tags (None: none), each checked. One string is refused, not read as a list
    of one-character tags."""
    if tags is None:
        return []
    if not isinstance(tags, list | tuple):
        raise InvalidInput(f"tags must be a list of tags, got {type(tags).__name__}")
    return [check_tag(t) for t in tags]


def checked_refs(refs: object) -> list:
    """A list of chunk references (hashes or prefixes, checked where they are looked up)."""
    if not isinstance(refs, list | tuple):
        raise InvalidInput(f"chunks must be a list of chunk hashes, got {type(refs).__name__}")
    return list(refs)


def check_unicode(text: str, what: str = "the text") -> str:
    """Text that is Unicode: JSON's \\ud800 decodes to a str that UTF-8 (tokenizers, msgpack
    records) refuses, and would fail only once the work is done."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInput(
                f"{what} holds a lone surrogate ({text[e.start]!r} at character {e.start}): "
                "it is not Unicode text"
            ) from None
    return text


def is_count(value: object) -> bool:
    """A whole number given as one: True and False are not counts."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_prompt(prompt: object) -> str:
    """A prompt with something to answer."""
    return check_text(prompt, "the prompt", "empty prompt")


def check_text(
    text: object,
    what: str = "a chunk's text",
    empty: str = "empty text: nothing to make a chunk of",
) -> str:
    """Text with something in it; `what` names it when it is not text, `empty` when blank."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput(empty)
    return text


def check_flag(name: str, value: object) -> bool:
    """A yes-or-no argument is True or False: a string such as "no" would read as yes."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be True or False, got {value!r}")
    return value


def check_callback(name: str, value: object) -> None:
    """A callback is a function or None: anything else would fail at its first call, in the
    middle of the work."""
    if value is not None and not callable(value):
        raise InvalidInput(f"{name} must be a function or None, got {type(value).__name__}")


def is_number(value: object) -> bool:
    """An int or a float: True and False are not numbers."""
    return isinstance(value, int | float) and not isinstance(value, bool)
