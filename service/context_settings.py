"""A context's settings: what each one means, its default, and which values are allowed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvchunks.common import InvalidInput
from kvchunks.store.chunk import ChunkInfo
from kvchunks.vocabulary import DEFAULT_MODE, check_flag, check_mode, check_recompute, is_count

DEFAULT_SETTINGS = {
    "mode": DEFAULT_MODE,  # how chunks computed apart are combined (vocabulary.MODES)
    "recompute": None,  # realign's fraction; None: vocabulary.DEFAULT_RECOMPUTE
    "auto_activate": False,  # activate each generation's prompt and answer
    "output_tokens": None,  # answer chunk size: None (one per answer), an int, or "manual"
}


def checked_settings(settings: dict, current_mode: str) -> dict:
    """`settings` as a context stores them, or InvalidInput (None sets the default; a new
    mode without a recompute fraction clears the fraction)."""
    unknown = set(settings) - set(DEFAULT_SETTINGS)
    if unknown:
        raise InvalidInput(f"unknown setting(s) {', '.join(sorted(unknown))}")
    # None is each setting's default, as it already was for recompute and output_tokens
    # (a JSON null over HTTP sets the default rather than being refused as an odd value).
    settings = {k: DEFAULT_SETTINGS[k] if v is None else v for k, v in settings.items()}
    if "mode" in settings:
        check_mode(settings["mode"])
        settings.setdefault("recompute", None)
    if "recompute" in settings:
        check_recompute(settings.get("mode", current_mode), settings["recompute"])
    check_flag("auto_activate", settings.get("auto_activate", False))
    tokens = settings.get("output_tokens")
    counted = is_count(tokens) and tokens > 0
    if tokens is not None and tokens != "manual" and not counted:
        raise InvalidInput(
            "output_tokens must be a positive integer, 'manual', or unset (one chunk per answer)"
        )
    return settings


def call_mode(
    settings: dict, mode: str | None, recompute: float | None
) -> tuple[str, float | None]:
    """The mode and recompute fraction of one call: as given, else the context's (whose
    fraction goes with its mode only)."""
    mode = mode or settings["mode"]
    if mode == settings["mode"] and recompute is None:
        recompute = settings["recompute"]
    check_recompute(check_mode(mode), recompute)
    return mode, recompute


@dataclass
class ContextView:
    """A context as `ContextManager.context()` shows it: its settings and active chunks."""

    name: str
    mode: str
    auto_activate: bool
    chunks: list[ChunkInfo]
    window: int
    recompute: float | None = None
    output_tokens: int | str | None = None  # answer chunk size, as DEFAULT_SETTINGS says

    @property
    def token_count(self) -> int:
        return sum(c.token_count for c in self.chunks)

    # The view reads as its active chunks, in the order the model reads them.
    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[ChunkInfo]:
        return iter(self.chunks)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "mode": self.mode,
            "recompute": self.recompute,
            "auto_activate": self.auto_activate,
            "output_tokens": self.output_tokens,
            "window": self.window,
            "token_count": self.token_count,
            "chunks": [c.to_json() for c in self.chunks],
        }
