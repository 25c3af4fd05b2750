"""The context's commands: what it shows, its settings, and answering with it. Each is a
`kvchunks` subcommand and the chat's slash command of the same name, as in commands.py.

Those that need only the registry (context, reorder, clear, mode, auto) work on
`state.catalog`, so a one-shot run never loads the model or imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from kvchunks.cli import render
from kvchunks.cli.shared import (
    INTERRUPTED,
    json_option,
    sampling_options,
    sampling_params,
    show,
)
from kvchunks.cli.state import State, pass_state
from kvchunks.common import InvalidInput
from kvchunks.vocabulary import MODES, check_prompt

if TYPE_CHECKING:
    from kvchunks import GenerationResult


@click.command()
@click.option(
    "--delete", is_flag=True, help="Forget the context: its active list, settings and name."
)
@json_option
@pass_state
def context(state: State, delete: bool, as_json: bool) -> None:
    """Show the active chunks in layout order and their tokens against the window; with
    --delete, forget the context instead (no chunk is deleted)."""
    cm = state.catalog
    if delete:
        count = len(cm.context().chunks)
        cm.delete_context()
        line = f"deleted context '{cm.context_name}' ({count} chunk(s) were active; none deleted)"
        return _show_context(state, as_json, line)
    view = cm.context()
    show(state, as_json, view.to_json(), lambda: render.context_table(view))


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="HASH...")
@json_option
@pass_state
def reorder(state: State, refs: tuple[str, ...], as_json: bool) -> None:
    """Lay the active chunks out in a new order: every active chunk, once. No KV is copied;
    the next answer reads them in this order."""
    view = state.catalog.reorder_chunks(list(refs))
    show(state, as_json, view.to_json(), lambda: render.context_table(view))


@click.command()
@json_option
@pass_state
def clear(state: State, as_json: bool) -> None:
    """Deactivate every chunk of the context (nothing is deleted)."""
    cm = state.catalog
    count = len(cm.context().chunks)
    cm.clear()
    line = f"deactivated {count} chunk(s); context '{cm.context_name}' is empty"
    _show_context(state, as_json, line)


# A negative RECOMPUTE is a value to refuse with the setting's own message, not an option.
@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("mode", type=click.Choice(MODES), required=False, metavar="[MODE]")
@click.argument("recompute", type=float, required=False, metavar="[RECOMPUTE]")
@json_option
@pass_state
def mode(state: State, mode: str | None, recompute: float | None, as_json: bool) -> None:
    """Show or set how the context combines chunks' KV: MODE is exact, reuse or realign,
    and RECOMPUTE (realign only) the fraction of tokens computed again, from 0 to 1.

    exact recomputes what was computed in another context, reuse attends to the stored KV
    as it is, realign re-places chunks at contiguous positions and recomputes the first
    tokens of each (the default fraction when RECOMPUTE is left out).
    """
    cm = state.catalog
    if mode and (state.mode or state.recompute is not None):
        raise InvalidInput(
            "--mode and --recompute set one run's mode; the context's is set by "
            f"`mode {mode}{'' if recompute is None else f' {recompute}'}` alone"
        )
    if mode:
        cm.configure(mode=mode, recompute=recompute)
    state.check_mode()
    line = f"mode: {render.mode_line(state.mode, state.recompute, cm.settings)}"
    _show_context(state, as_json, line)


@click.command()
@click.argument("switch", type=click.Choice(["on", "off"]), required=False, metavar="[on|off]")
@json_option
@pass_state
def auto(state: State, switch: str | None, as_json: bool) -> None:
    """Show or set whether each prompt and answer is activated after a generation."""
    cm = state.catalog
    if switch:
        cm.configure(auto_activate=switch == "on")
    line = f"auto-activate: {'on' if cm.settings['auto_activate'] else 'off'}"
    _show_context(state, as_json, line)


def _show_context(state: State, as_json: bool, line: str) -> None:
    """The context view, as the REST API's context routes return it; as text, `line`."""
    show(state, as_json, lambda: state.catalog.context().to_json(), line)


# -- generation -------------------------------------------------------------------------------


@click.command()
@click.argument("prompt")
@sampling_options
@json_option
@pass_state
def generate(state: State, prompt: str, sampling: dict, as_json: bool) -> None:
    """Answer PROMPT with the active context, streaming the text; the prompt and the answer
    become chunks (the footer on stderr names them). Stopped by Ctrl-C, the partial answer is
    kept, and the exit status is 130."""
    if as_json:
        result = run_generation(state, prompt, sampling)
        click.echo(render.dumps(result.to_json()))
    else:
        result = run_generation(state, prompt, sampling, on_text=stream)
        click.echo()
        state.err.print(render.generation_footer(result), markup=False, highlight=False)
    if result.interrupted:  # a script must not take the partial answer for a whole one
        sys.exit(INTERRUPTED)


def run_generation(
    state: State, prompt: str, sampling: dict, on_text: Callable[[str], None] | None = None
) -> GenerationResult:
    params = sampling_params(sampling)  # checked before the model loads, as the mode is
    check_prompt(prompt)
    state.check_mode()
    return state.manager.generate(
        prompt, params, mode=state.mode, on_text=on_text, recompute=state.recompute
    )


def stream(text: str) -> None:
    click.echo(text, nl=False)


SUBCOMMANDS = [context, reorder, clear, mode, auto, generate]
