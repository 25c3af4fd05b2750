"""The `kvchunks` command: the chat, one subcommand per chunk operation, models, benchmarks.

Nothing here imports torch: the model loads when a command first needs it.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import click

from kvchunks.cli import commands, context_commands
from kvchunks.cli.demo import demo
from kvchunks.cli.http import http
from kvchunks.cli.model import model
from kvchunks.cli.service import SERVICE_COMMANDS
from kvchunks.cli.shared import (
    HELP_OPTIONS,
    INTERRUPTED,
    dtype_option,
    sampling_options,
    sampling_params,
    usage_message,
)
from kvchunks.cli.state import MODEL_ENV, State, pass_state
from kvchunks.cli.tree import tree
from kvchunks.common import HOME_ENV, InvalidInput, KVChunksError
from kvchunks.vocabulary import MODES, check_name

# The commands whose generations --mode and --recompute set (the others would ignore them).
GENERATING = ("generate", "chat", "demo", "mode")


class Group(click.Group):
    """Every error is one line on stderr: kvchunks' own exit 1, usage errors exit 2, Ctrl-C
    exits 130."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with one_line_errors():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        with one_line_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    try:
        yield
    except KVChunksError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError:
        raise  # a group given no command: click shows its help
    except click.UsageError as e:
        click.echo(f"error: {usage_message(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line too, and the shell's status for it
        click.echo("error: interrupted", err=True)
        sys.exit(INTERRUPTED)


def state_options(f: Callable) -> Callable:
    """The options that say what to work on; the group has them, and so has `chat`."""
    options = [
        click.option(
            "--model",
            envvar=MODEL_ENV,
            type=click.Path(path_type=Path),
            help=f"Checkpoint folder (Hugging Face layout). Default: ${MODEL_ENV}, else "
            "SmolLM2-135M-Instruct, prepared in the data directory on first use.",
        ),
        dtype_option,
        click.option(
            "--data-dir",
            envvar=HOME_ENV,
            type=click.Path(file_okay=False, path_type=Path),
            help=f"Where chunks, their KV files, the registry and models live. Default: "
            f"${HOME_ENV}, else ~/.local/share/kvchunks.",
        ),
        click.option("--context", help="The named activation set to work on [default: default]."),
        click.option(
            "--mode",
            type=click.Choice(MODES),
            help="How this run's generations combine chunks' KV. Default: the context's "
            "setting (see `kvchunks mode`).",
        ),
        click.option(
            "--recompute",
            type=float,
            help="With realign: the fraction of the active chunks' tokens whose KV is computed "
            "again in order, from 0 to 1. Default: the context's setting.",
        ),
        click.option(
            "--address",
            help="Work on a kvchunks service on this Ray cluster instead of in this process.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def apply_options(
    state: State,
    model: Path | None,
    dtype: str | None,
    data_dir: Path | None,
    context: str | None,
    mode: str | None,
    recompute: float | None,
    address: str | None,
) -> None:
    """Set the options that were given; the data directory also holds the default model."""
    if data_dir is not None:
        os.environ[HOME_ENV] = str(data_dir)
        state.home = data_dir
    if model is not None:
        state.model = str(model)
    state.dtype = dtype or state.dtype
    state.context = check_name(context) if context is not None else state.context
    state.mode = mode or state.mode
    state.recompute = recompute if recompute is not None else state.recompute
    state.address = address or state.address


@click.group("kvchunks", cls=Group, context_settings={"help_option_names": HELP_OPTIONS})
@state_options
@click.pass_context
def cli(ctx: click.Context, **options) -> None:
    """kvchunks: keep every piece of context as a reusable KV-cache chunk.

    Chunks and contexts persist in the data directory between runs. Every chunk
    operation is a subcommand here and a slash command in `kvchunks chat`; a HASH is a
    full chunk hash or a unique prefix of 4 or more hex digits.
    """
    state = ctx.ensure_object(State)  # a new one, unless the caller passes its own
    combining = options["mode"] is not None or options["recompute"] is not None
    if combining and ctx.invoked_subcommand not in GENERATING:
        raise click.UsageError(
            f"--mode and --recompute apply to {', '.join(GENERATING)}; "
            f"`{ctx.invoked_subcommand}` does not generate",
            ctx,
        )
    apply_options(state, **options)
    ctx.call_on_close(state.close)


for command in [*commands.SUBCOMMANDS, *context_commands.SUBCOMMANDS]:
    cli.add_command(command)
for command in SERVICE_COMMANDS:  # serve, status, stop: the Ray actors
    cli.add_command(command)
cli.add_command(demo)
cli.add_command(http)
cli.add_command(model)
cli.add_command(tree)


@cli.command()
@state_options
@sampling_options
@pass_state
def chat(state: State, sampling: dict, **options) -> None:
    """Talk to the model with the active context; slash commands manage the chunks.

    Plain text generates (streamed; Ctrl-C stops it and keeps the partial answer as a
    chunk), /help lists the commands, Tab completes commands, files and hashes, Ctrl-D or
    /quit leaves. The sampling options set how every answer is sampled; /set changes them.
    """
    from kvchunks.cli.chat import run

    apply_options(state, **options)
    sampling_params(sampling)  # a bad option is refused before the chat starts
    state.check_mode()
    state.sampling = sampling
    run(state)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name: str | None, args: tuple[str, ...]) -> None:
    """Run benchmark NAME from kvchunks.bench, passing it ARGS (try `NAME --help`).

    Without NAME, list the benchmarks. Each prints one JSON object.
    """
    available = benches()
    if name is None:
        click.echo("\n".join(available))
        return
    if name not in available:
        raise InvalidInput(f"no benchmark {name!r}; available: {', '.join(available)}")
    sys.argv = [name, *args]
    runpy.run_module(f"kvchunks.bench.{name}", run_name="__main__", alter_sys=True)


def benches() -> list[str]:
    files = resources.files("kvchunks.bench").iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and f.name[0] != "_")


def main() -> None:
    signal.signal(signal.SIGTERM, _stopped)
    cli(prog_name="kvchunks")


def _stopped(signum: int, _frame: object) -> None:
    """SIGTERM (kill, systemd, docker) ends the command as Ctrl-C does: its context closes and
    the exit hooks run, so the embedded Redis it started stops with it (uvicorn hands the
    signal on here once the server has shut down gracefully). The status says why it ended."""
    sys.exit(128 + signum)
