"""What the commands (and the chat's own) share: the common options and arguments, and how a
result is printed: one JSON document with --json, else plain lines or a table."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import click
from rich.console import RenderableType

from kvchunks.cli import render
from kvchunks.cli.state import State
from kvchunks.vocabulary import DTYPES

if TYPE_CHECKING:
    from kvchunks import Catalog, ChunkInfo, SamplingParams

# What a generation from the command line uses where no option says otherwise (greedy, unlike
# SamplingParams()); `sampling_options` hands over only the options given.
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C, as shells report it
HELP_OPTIONS = ["-h", "--help"]  # of every command, and of every slash command in the chat
DEFAULT_SAMPLING = {"temperature": 0.0, "max_tokens": 256, "top_p": 1.0, "top_k": 0, "seed": None}
SAMPLING_OPTIONS = [
    *DEFAULT_SAMPLING,
    "stop",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
]
DTYPE_ENV = "KVCHUNKS_DTYPE"

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document instead of text."
)
hash_argument = click.argument("ref", metavar="HASH")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    envvar=DTYPE_ENV,
    help=f"The dtype the model computes in (weights and KV). Default: ${DTYPE_ENV}, else "
    "float32. Chunks computed in one dtype are used only in that dtype.",
)

step_tokens_option = click.option(
    "--max-num-batched-tokens",
    "step_tokens",
    type=click.IntRange(min=1),
    help="New tokens one step of the engine computes at most: longer prompts and documents "
    "go in pieces, and running answers wait for a token at most a step "
    "[512 on CPU, 2048 on CUDA].",
)


def say(state: State, line: str) -> None:
    """One plain line of output (no markup: chunk text and paths may contain brackets)."""
    state.out.print(line, markup=False, highlight=False, soft_wrap=True)


Shown = str | list[str] | RenderableType


def show(
    state: State,
    as_json: bool,
    document: Any | Callable[[], Any],
    text: Shown | Callable[[], Shown],
) -> None:
    """`document` (or the function that makes it) as JSON with --json; else `text`: a plain
    line, plain lines, a table, or the function that makes one of them. Each is made only when
    shown: a table of many chunks is not built for --json, nor a context view (which reads
    the model's window) for a line that does not need one."""
    if as_json:
        click.echo(render.dumps(document() if callable(document) else document))
        return
    if callable(text):
        text = text()
    if isinstance(text, str):
        say(state, text)
    elif isinstance(text, list):
        for line in text:
            say(state, line)
    else:
        state.out.print(text)


def usage_message(e: click.UsageError) -> str:
    """One line: click's message, and where the help is."""
    hint = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
    if isinstance(e, click.exceptions.NoArgsIsHelpError) and e.ctx:  # its message is the help
        command = e.ctx.command
        if isinstance(command, click.Group):
            return f"a command is missing: {', '.join(command.list_commands(e.ctx))}{hint}"
        return f"arguments are missing{hint}"
    # Some of click's messages span lines (a missing choice lists one choice per line).
    return " ".join(e.format_message().split()) + hint


def sampling_options(f: Callable) -> Callable:
    """--max-tokens, --temperature, --top-p, --top-k, --seed, --stop and the penalties, as
    one dict `sampling` of the options given (SamplingParams' names); SamplingParams checks
    the penalties' ranges."""
    options = [
        click.option(
            "--max-tokens", type=click.IntRange(min=1), help="Most tokens to generate [256]."
        ),
        click.option(
            "--temperature", type=click.FloatRange(min=0), help="0 picks the likeliest token [0]."
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(0, 1, min_open=True),
            help="Sample from the likeliest tokens that make up this probability [1].",
        ),
        click.option(
            "--top-k", type=click.IntRange(min=0), help="Sample from the K likeliest; 0: all [0]."
        ),
        click.option("--seed", type=int, help="Seed of the sampler, for repeatable answers."),
        click.option(
            "--stop",
            multiple=True,
            help="End the answer before this text; repeatable [none].",
        ),
        click.option(
            "--repetition-penalty",
            type=float,
            help="Above 1 makes tokens already seen (context, prompt, answer) less likely [1].",
        ),
        click.option(
            "--presence-penalty",
            type=float,
            help="-2 to 2: taken off the logit of every token the answer already has [0].",
        ),
        click.option(
            "--frequency-penalty",
            type=float,
            help="-2 to 2: taken off a token's logit once per time the answer has it [0].",
        ),
    ]

    @functools.wraps(f)
    def wrapper(**kwargs):
        given = {k: kwargs.pop(k) for k in SAMPLING_OPTIONS}
        sampling = {k: v for k, v in given.items() if v not in (None, ())}
        if "stop" in sampling:
            sampling["stop"] = list(sampling["stop"])
        return f(sampling=sampling, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def sampling_params(sampling: dict) -> SamplingParams:
    """The SamplingParams of the options given, the command line's defaults for the rest
    (checked here, before any model loads)."""
    from kvchunks import SamplingParams

    return SamplingParams(**(DEFAULT_SAMPLING | sampling))


def check_refs(state: State, refs: Iterable[str]) -> None:
    """Refuse an unknown or ambiguous HASH from the registry, before the model loads."""
    for ref in refs:
        state.catalog.get_chunk(ref)


def active_hashes(cm: Catalog) -> set[str]:
    return {c.hash for c in cm.context().chunks}


def show_switched(
    state: State, as_json: bool, activating: bool, chunks: list[ChunkInfo], before: set[str]
) -> None:
    """The chunks (de)activated, each as the REST API's activate and deactivate return it;
    as text, a line each (saying so of those that were so already: `before`, the chunks
    active before) and the window's use."""
    verb, same = ("activated", "already active") if activating else ("deactivated", "not active")

    def line(chunk: ChunkInfo) -> str:
        changed = (chunk.hash in before) != activating
        return f"{verb if changed else same} {render.describe(chunk)}"

    def lines() -> list[str]:
        view = state.catalog.context()
        window = f"{len(view.chunks)} active, {view.token_count} of {view.window} tokens"
        return [*map(line, chunks), window]

    show(state, as_json, [c.to_json() for c in chunks], lines)
