"""`kvchunks chat`: plain text generates with the active context; slash commands manage chunks.

A slash command is a click command, looked up in one table (`SLASH`) and run with the chat's
state: the chunk operations are the `kvchunks` subcommands themselves (commands.py,
context_commands.py), and the few that only make sense in a chat are /output
(output_commands.py) and /stats, /help and /quit, defined here. Tab completion reads the same
click parameters: choices, file paths and chunk hashes.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from rich.table import Table

from kvchunks.cli import commands, context_commands, render
from kvchunks.cli.output_commands import output
from kvchunks.cli.shared import (
    HELP_OPTIONS,
    SAMPLING_OPTIONS,
    sampling_options,
    sampling_params,
    say,
    usage_message,
)
from kvchunks.cli.state import State, pass_state
from kvchunks.cli.tree import tree
from kvchunks.common import InvalidInput, KVChunksError

if TYPE_CHECKING:
    from kvchunks import ChunkInfo

HISTORY_FILE = "chat_history"


class Quit(Exception):
    """Raised by /quit to leave the chat."""


# -- the commands that only a chat has ----------------------------------------------------------


@click.command()
@pass_state
def stats(state: State) -> None:
    """Show pool usage, chunks per tier, store counters and the last generation's speed."""
    state.out.print(render.stats_table(state.manager.stats()))


@click.command("help")
@click.argument("name", required=False)
@pass_state
def help_(state: State, name: str | None) -> None:
    """List the slash commands, or show the full help of one."""
    if name is None:
        state.out.print(help_table())
        return
    command = SLASH.get(name.lstrip("/"))
    if command is None:
        raise InvalidInput(f"no command /{name.lstrip('/')}; /help lists them")
    click.echo(command.get_help(slash_context(name.lstrip("/"), command)))


@click.command("set")
@sampling_options
@click.option("--reset", is_flag=True, help="Go back to the defaults first.")
@pass_state
def set_(state: State, sampling: dict, reset: bool) -> None:
    """Show or change how the next answers are sampled: the options of `kvchunks generate`
    (--stop replaces the stop strings)."""
    settings = ({} if reset else state.sampling) | sampling
    params = sampling_params(settings)  # a bad value is refused and changes nothing
    state.sampling = settings
    shown = {name: params.to_dict()[name] for name in SAMPLING_OPTIONS}
    say(state, "sampling: " + ", ".join(f"{k} {v}" for k, v in shown.items()))


@click.command("quit")
def quit_() -> None:
    """Leave the chat (Ctrl-D does too)."""
    raise Quit


# One table: slash command name -> click command. Chunk operations are the subcommands.
SLASH: dict[str, click.Command] = {
    "load": commands.load,
    "save": commands.export,
    "restore": commands.import_,
    "list": commands.list_chunks,
    "activate": commands.activate,
    "deactivate": commands.deactivate,
    "delete": commands.delete,
    "context": context_commands.context,
    "reorder": context_commands.reorder,
    "clear": context_commands.clear,
    "info": commands.info,
    "tree": tree,
    "compose": commands.compose,
    "split": commands.split,
    "tag": commands.tag,
    "populate": commands.populate,
    "output": output,
    "move": commands.move,
    "prefetch": commands.prefetch,
    "mode": context_commands.mode,
    "auto": context_commands.auto,
    "set": set_,
    "stats": stats,
    "help": help_,
    "quit": quit_,
}


def help_table() -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(no_wrap=True)
    table.add_column()
    for name, command in SLASH.items():
        line = f"/{name} {usage(name, command)}".rstrip()
        render.add_row(table, line, command.get_short_help_str(80))
    render.add_row(table, "text", "anything not starting with / is a prompt: generate an answer")
    table.caption = "HASH: a full hash or a unique prefix of 4+ hex digits; /help NAME for more"
    return table


def usage(name: str, command: click.Command) -> str:
    if isinstance(command, click.Group):
        return "|".join(command.commands)
    pieces = command.collect_usage_pieces(slash_context(name, command))
    return " ".join(p for p in pieces if p != "[OPTIONS]")


def slash_context(name: str, command: click.Command) -> click.Context:
    # Every context of a command must name the same help options: click makes a command's help
    # option once, from the first context that asks, and keeps it.
    return click.Context(command, info_name=f"/{name}", help_option_names=HELP_OPTIONS)


# -- the loop -----------------------------------------------------------------------------------


def run(state: State) -> None:
    Chat(state).loop()


class Chat:
    def __init__(self, state: State):
        self.state = state
        self.manager = state.manager  # load the model before the first prompt
        self._chunks: list[ChunkInfo] | None = None  # for completion; refreshed after each line
        self.read = self._prompt_reader() if sys.stdin.isatty() else _read_line

    def loop(self) -> None:
        self.banner()
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            except UnicodeDecodeError:
                self.error("a line of input is not UTF-8 text; it was skipped")
                continue
            try:
                self.handle(line.strip())
            except Quit:
                break
            finally:
                self._chunks = None

    def banner(self) -> None:
        view = self.manager.context()
        model = Path(self.state.model).name if self.state.model else self.state.address
        say(
            self.state,
            f"kvchunks chat · {model} · context '{view.name}', mode {self.state.mode or view.mode}"
            f", {len(view.chunks)} active chunk(s), {view.token_count} of {view.window} tokens",
        )
        say(
            self.state,
            "Type to generate; /help lists commands; Ctrl-C stops an answer; Ctrl-D leaves.",
        )

    def handle(self, line: str) -> None:
        if not line:
            return
        try:
            if line.startswith("/"):
                self.slash(line[1:])
            else:
                self.generate(line)
        except KVChunksError as e:
            self.error(str(e))
        except click.UsageError as e:
            self.error(usage_message(e))
        except click.ClickException as e:
            self.error(e.format_message())
        except (KeyboardInterrupt, click.Abort):
            self.error("interrupted")
        except Quit:
            raise
        except Exception as e:  # a bug: say so in one line, and keep the chat (and its pool)
            self.error(f"internal error, please report it: {type(e).__name__}: {e}")

    def slash(self, text: str) -> None:
        try:
            words = shlex.split(text)
        except ValueError as e:  # an unclosed quote
            raise click.UsageError(str(e)) from e
        name, args = (words[0], words[1:]) if words else ("help", [])
        command = SLASH.get(name)
        if command is None:
            raise click.UsageError(f"unknown command /{name}; /help lists them")
        command.main(
            args,
            prog_name=f"/{name}",
            standalone_mode=False,
            obj=self.state,
            help_option_names=HELP_OPTIONS,
        )

    def generate(self, prompt: str) -> None:
        streamed = []

        def on_text(text: str) -> None:
            streamed.append(text)
            context_commands.stream(text)

        try:
            result = context_commands.run_generation(
                self.state, prompt, self.state.sampling, on_text
            )
        finally:
            if streamed:  # the footer, or an error, starts a line of its own
                click.echo()
        self.state.out.print(
            render.generation_footer(result), style="dim", markup=False, highlight=False
        )

    def error(self, message: str) -> None:
        self.state.err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)

    def chunks(self) -> list[ChunkInfo]:
        if self._chunks is None:
            self._chunks = self.manager.list_chunks()
        return self._chunks

    def _prompt_reader(self) -> Callable[[], str]:
        history = self.state.data_dir / HISTORY_FILE
        history.parent.mkdir(parents=True, exist_ok=True)
        session: PromptSession[str] = PromptSession(
            history=FileHistory(str(history)),
            completer=SlashCompleter(self),
            complete_while_typing=False,
        )
        return lambda: session.prompt(f"{self.state.context}> ")


def _read_line() -> str:
    """Input that is not a terminal (a pipe, a file): one command or prompt per line, each
    decoded alone, so that a line that is not UTF-8 is refused by itself (a text stream's
    decoder would fail on, and lose, the block of input around it)."""
    line = sys.stdin.buffer.readline()
    if not line:
        raise EOFError
    return line.decode("utf-8").removeprefix("\ufeff")  # a file saved with a BOM


# -- completion ---------------------------------------------------------------------------------


class SlashCompleter(Completer):
    """Completes slash commands, then each argument by its click parameter: a choice, a file
    path, or a chunk hash (any parameter whose metavar names HASH)."""

    def __init__(self, chat: Chat):
        self.chat = chat
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        words = text[1:].split()
        if not words or text[-1].isspace():
            words.append("")
        if len(words) == 1:
            yield from _words([f"/{n}" for n in SLASH], "/" + words[0])
        elif words[0] in SLASH:
            yield from self._argument(SLASH[words[0]], words[1:-1], words[-1], event)

    def _argument(
        self, command: click.Command, before: list[str], word: str, event: CompleteEvent
    ) -> Iterator[Completion]:
        if isinstance(command, click.Group):
            if not before:
                yield from _words(command.commands, word)
            elif before[0] in command.commands:
                yield from self._argument(command.commands[before[0]], before[1:], word, event)
            return
        if word.startswith("-"):
            options = [o for p in command.params if isinstance(p, click.Option) for o in p.opts]
            yield from _words(options, word)
            return
        for param in _next(command, before):
            if isinstance(param.type, click.Choice):
                yield from _words([str(c) for c in param.type.choices], word)
            elif isinstance(param.type, click.Path):
                yield from self.paths.get_completions(Document(word, len(word)), event)
            elif "HASH" in (param.metavar or ""):
                yield from self._hashes(word)

    def _hashes(self, word: str) -> Iterator[Completion]:
        try:
            chunks = self.chat.chunks()
        except KVChunksError:
            return
        for c in chunks:
            if c.hash.startswith(word.lower()):
                what = f"{render.type_label(c)} · {c.token_count} tok"
                meta = f"{what} · {render.preview(c.text, 40)}"
                short = render.short(c.hash)
                yield Completion(f"{short} ", -len(word), display=short, display_meta=meta)


def _words(candidates: Iterable[str], word: str) -> Iterator[Completion]:
    """Each candidate that `word` begins, followed by a space, as a shell completes a word:
    the next one is typed straight after it."""
    for candidate in candidates:
        if candidate.startswith(word):
            yield Completion(f"{candidate} ", -len(word), display=candidate)


def _next(command: click.Command, before: list[str]) -> list[click.Parameter]:
    """What the next word may fill, given the words typed before it: the value of the option
    just typed, else the next argument. A variadic argument (HASH...) followed by another
    (TIER) takes words until the last ones: once it has one, the next word may be either."""
    options = {o: p for p in command.params if isinstance(p, click.Option) for o in p.opts}
    count, option = 0, None
    for word in before:
        if option is not None:
            option = None  # this word was its value
        elif word.startswith("-"):
            found = options.get(word)
            option = found if found is not None and not found.is_flag else None
        else:
            count += 1
    if option is not None:
        return [option]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    for i, param in enumerate(arguments):
        if param.nargs == -1:
            return [param, *arguments[i + 1 : i + 2]] if count >= 1 else [param]
        if count < param.nargs:
            return [param]
        count -= param.nargs
    return []
