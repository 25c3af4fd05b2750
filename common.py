"""Small types shared by the engine, the store and everything above them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "KVCHUNKS_HOME"


def data_dir() -> Path:
    """Where kvchunks keeps models, chunk KV and the embedded Redis: `KVCHUNKS_HOME`, else
    `~/.local/share/kvchunks`."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".local" / "share" / "kvchunks"


@dataclass(frozen=True)
class KVSegment:
    """A run of `length` tokens of stored KV, laid out contiguously in paged blocks.

    Token i lives at slot `start + i` of the virtual concatenation of `blocks`, so a
    segment may begin and end in the middle of a block. `position` is the RoPE position
    its first token was computed at. `shift` is a RoPE delta to apply to its keys when it
    is attended (used to re-place standalone chunks at new positions; 0 = as stored).
    """

    blocks: tuple[int, ...]
    start: int
    length: int
    position: int
    shift: int = 0

    def slot_runs(self, block_size: int) -> list[tuple[int, int]]:
        """The segment's pool slots as (first flat slot, count) runs; blocks that follow one
        another in the pool make one run, so a copy of the segment is a few large copies."""
        runs: list[tuple[int, int]] = []
        at, end = self.start, self.end_slot()
        while at < end:
            count = min(block_size - at % block_size, end - at)
            first = self.blocks[at // block_size] * block_size + at % block_size
            if runs and sum(runs[-1]) == first:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((first, count))
            at += count
        return runs

    def end_slot(self) -> int:
        """Offset, within the concatenation of `blocks`, just past the last token."""
        return self.start + self.length

    def sub(self, offset: int, length: int, block_size: int) -> KVSegment:
        """The part of this segment from token `offset`, `length` tokens long (no copy)."""
        first = (self.start + offset) // block_size
        last = (self.start + offset + max(length, 1) - 1) // block_size
        return KVSegment(
            blocks=self.blocks[first : last + 1],
            start=(self.start + offset) % block_size,
            length=length,
            position=self.position + offset,
            shift=self.shift,
        )


def slice_segments(
    segments: list[KVSegment], start: int, length: int, block_size: int
) -> list[KVSegment]:
    """Tokens [start, start + length) of the concatenation of `segments`, as segments."""
    out, offset = [], 0
    for seg in segments:
        lo, hi = max(start, offset), min(start + length, offset + seg.length)
        if lo < hi:
            out.append(seg.sub(lo - offset, hi - lo, block_size))
        offset += seg.length
    return out


def read_text_file(path: str | Path) -> str:
    """A file's text, refusing what is missing, empty, binary or not UTF-8."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidInput(f"no such file: {file}")
    data = file.read_bytes()
    if not data.strip():
        raise InvalidInput(f"{file} is empty")
    if b"\x00" in data[:8192]:
        raise InvalidInput(f"{file} looks binary; load text files only")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{file} is not UTF-8 text (byte {e.start}); convert it first") from e


class KVChunksError(Exception):
    """Base of every error kvchunks raises on purpose; its message is one line for a user."""


class InvalidInput(KVChunksError, ValueError):
    """An argument, file or setting that cannot be used as given."""


class ChunkNotFound(KVChunksError, KeyError):
    """No chunk has this hash or hash prefix."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AmbiguousHash(KVChunksError, KeyError):
    """A hash prefix matches more than one chunk."""

    def __init__(self, prefix: str, candidates: list[str]):
        self.prefix = prefix
        self.candidates = sorted(candidates)
        shown = ", ".join(c[:12] for c in self.candidates[:8])
        more = f" and {len(self.candidates) - 8} more" if len(self.candidates) > 8 else ""
        super().__init__(
            f"hash prefix '{prefix}' is ambiguous: matches {shown}{more}; give more characters"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class ChunkInUse(KVChunksError):
    """The chunk is still referenced (by views, or by a running generation)."""


class ContextWindowExceeded(KVChunksError):
    """More tokens than the model's context window."""


class CapacityError(KVChunksError):
    """No room left in the KV pool or a storage tier."""


class ConcurrentChange(KVChunksError):
    """Another client changed the same state between this call's check and its write."""


class ChunkFileError(KVChunksError):
    """A chunk file that is corrupted, truncated, or from another model, dtype or shape."""


class RegistryUnavailable(KVChunksError):
    """The Redis server behind the registry cannot be reached."""
