"""Where `export` writes a chunk file and where `import` reads one. A relative path is under
`<data dir>/exports`. Nothing here needs the model, so the command line checks a path
before it loads one: a mistyped path is refused at once, not after the model is ready."""

from __future__ import annotations

from pathlib import Path

from kvchunks.common import ChunkFileError, InvalidInput, checked_path
from kvchunks.vocabulary import check_flag


def export_target(home: Path, path: str | Path, force: bool) -> Path:
    """The file `export` writes: an absolute path in a directory that exists, or a relative
    one that may not climb out of the exports directory (its directories are made as the
    file is written). An existing file is overwritten only with `force`."""
    check_flag("force", force)
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
