"""What every layer shares: the data directory, reading a text file, where exported chunk
files go, progress reports, and the errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

HOME_ENV = "KVCHUNKS_HOME"

# How long work reports how far it is: done, and in all (tokens, or bytes of KV moved).
OnProgress = Callable[[int, int], None]


def part_by_layer(
    report: OnProgress, before: int, tokens: int, total: int
) -> Callable[[int, int], None]:
    """A layer callback that reports a part of `tokens` tokens after `before` done: in
    proportion to the layers its one pass has been through."""
    return lambda layer, layers: report(before + tokens * layer // layers, total)


def data_dir() -> Path:
    """Where kvchunks keeps models, chunk KV and the embedded Redis: `KVCHUNKS_HOME`, else
    `~/.local/share/kvchunks`."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".local" / "share" / "kvchunks"


def checked_path(path: object) -> Path:
    """A file path given as a str or a Path, with ~ expanded."""
    if not isinstance(path, str | Path):
        raise InvalidInput(f"a file path is a str or a Path, got {type(path).__name__}")
    return Path(path).expanduser()


def read_text_file(path: str | Path) -> str:
    """A file's text, refusing what is missing, empty, binary or not UTF-8."""
    file = checked_path(path)
    if file.is_dir():  # which of its files, and how deep, is for the user to say
        raise InvalidInput(f"{file} is a directory; give its text files, as in {file}/*.txt")
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


def export_target(home: Path, path: str | Path, force: bool) -> Path:
    """The file `export` writes: an absolute path in a directory that exists, or a relative
    one that may not climb out of the exports directory (its directories are made as the
    file is written). An existing file is overwritten only with `force`."""
    base = (home / "exports").resolve()
    given = checked_path(path)
    target = given if given.is_absolute() else (base / given).resolve()
    if not given.is_absolute() and base not in target.parents:
        raise InvalidInput(f"{path} leaves the exports directory {base}; give an absolute path")
    if target.is_dir():
        raise InvalidInput(f"{target} is a directory; give the path of the file to write")
    if target.exists() and not force:
        raise InvalidInput(f"{target} exists; overwrite it with force=True (--force)")
    if given.is_absolute() and not target.parent.is_dir():
        raise InvalidInput(f"directory {target.parent} does not exist")
    return target


def import_source(home: Path, path: str | Path) -> Path:
    """The file `import` reads: the path as given, else (relative and not found) the one in
    the exports directory."""
    file = checked_path(path)
    if not file.is_absolute() and not file.exists():
        file = home / "exports" / file
    if not file.exists():
        raise ChunkFileError(f"chunk file {file} does not exist")
    return file


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


class DtypeMismatch(ChunkFileError):
    """KV computed in one dtype, asked for by a model that computes in another: never mixed."""

    def __init__(self, what: str, found: str, expected: str):
        self.found, self.expected = found, expected
        super().__init__(
            f"{what} was computed in {found} and this model runs in {expected}; run with "
            f"--dtype {found} (or KVCHUNKS_DTYPE={found}) to use it"
        )


class RegistryUnavailable(KVChunksError):
    """The Redis server behind the registry cannot be reached."""


class ListenerGone(KVChunksError):
    """The caller of a streamed answer stopped listening (its HTTP client went away, a
    Ctrl-C): raised inside the answer at its next piece of text, which ends it; nothing of
    the answer is kept."""


class ServiceUnavailable(KVChunksError):
    """Ray, or the kvchunks actors on it, cannot be reached."""


class WorkerDied(ServiceUnavailable):
    """An InferenceWorker died while serving a call (Ray restarts it; the call may be retried)."""
