"""Progress bars of long operations, drawn from the numbers the work reports as it goes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from kvchunks.cli.state import State
from kvchunks.common import OnProgress

LARGE_FILE = 16 << 10  # bytes; loading a bigger file shows a progress bar


class TokenRate(ProgressColumn):
    """Tokens per second over the last updates (the final rate once done)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tokens/s" if speed else "", style="progress.data.speed")


@contextlib.contextmanager
def _progress(console: Console, description: str, *amount: ProgressColumn) -> Iterator[OnProgress]:
    """A bar with the `amount` columns (done, total, rate), percentage and elapsed time on
    `console`; the callback it yields moves it. It is gone from the screen once the block
    ends."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        *amount,
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield advance


def token_progress(
    console: Console, description: str
) -> contextlib.AbstractContextManager[OnProgress]:
    """A bar of tokens done, total and tokens per second."""
    return _progress(console, description, MofNCompleteColumn(), TextColumn("tokens"), TokenRate())


@contextlib.contextmanager
def load_progress(state: State, file: Path) -> Iterator[OnProgress | None]:
    """The bar of `kvchunks load`, for a large file in a terminal (else None). The Ray client
    cannot call back into this process, so a load on a cluster shows none."""
    if file.stat().st_size < LARGE_FILE or not state.err.is_terminal or state.address:
        yield None
        return
    with token_progress(state.err, f"computing the KV of {file.name}") as on_progress:
        yield on_progress


@contextlib.contextmanager
def move_progress(state: State, chunks: int) -> Iterator[OnProgress | None]:
    """The bar of `kvchunks move`: bytes of KV moved, total and rate, when several chunks
    move in a terminal (else None; none on a cluster, as for loads)."""
    if chunks < 2 or not state.err.is_terminal or state.address:
        yield None
        return
    bar = _progress(state.err, f"moving {chunks} chunks", DownloadColumn(), TransferSpeedColumn())
    with bar as on_progress:
        yield on_progress
