"""The `kvchunks` command without a model: help, usage errors, files refused before loading,
benchmarks. Fast: nothing here loads the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kvchunks.cli.main import cli
from kvchunks.cli.model import StepBar

SUBCOMMANDS = [
    "chat",
    "load",
    "list",
    "info",
    "activate",
    "deactivate",
    "generate",
    "compose",
    "split",
    "tag",
    "delete",
    "populate",
    "move",
    "prefetch",
    "export",
    "import",
    "context",
    "clear",
    "mode",
    "auto",
    "model",
    "bench",
    "http",
    "tree",
]


def invoke(args: list[str], home: Path | None = None):
    env = {"KVCHUNKS_HOME": str(home)} if home else {}
    return CliRunner().invoke(cli, args, env={"NO_COLOR": "1", "COLUMNS": "200", **env})


def by_command_line(cases: list[tuple[list[str], str]]) -> list:
    """(arguments, expected text) cases, each named by its command line."""
    return [pytest.param(args, text, id=" ".join(args)) for args, text in cases]


def all_commands(group: click.Group = cli, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*path, name))


def test_group_help_lists_commands_and_global_options():
    result = invoke(["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert f"  {name} " in result.output, name
    for option in ["--model", "--data-dir", "--context", "--mode", "--address"]:
        assert option in result.output
    assert "KVCHUNKS_MODEL" in result.output and "KVCHUNKS_HOME" in result.output


@pytest.mark.parametrize("path", [p for p, _ in all_commands()], ids=" ".join)
def test_every_command_help_names_its_options_and_arguments(path):
    command = dict(all_commands())[path]
    result = invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: kvchunks {' '.join(path)}" in result.output
    assert command.help and command.help.split()[0] in result.output
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.opts[-1] in result.output, (path, param.opts)
            assert param.help, (path, param.opts)  # every option says what it does
        else:
            metavar = param.make_metavar(click.Context(command)).strip("[].")
            assert metavar.split()[0] in result.output, (path, param.name)


def test_help_and_usage_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from kvchunks.cli.main import cli\n"
        "cli(['--help'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    by_command_line(
        [
            (["--mode", "fast", "list"], "Invalid value for '--mode': 'fast' is not one of"),
            # Not ignored where nothing is generated.
            (["--mode", "exact", "list"], "apply to generate, chat, demo, mode; `list` does"),
            (["--recompute", "0.3", "delete", "abcd"], "`delete` does not generate"),
            (["mode", "fast"], "Invalid value for '[MODE]': 'fast' is not one of"),
            (["info"], "Missing argument 'HASH'."),
            (["info", "abcd", "extra"], "Got unexpected extra argument (extra)"),
            (["split", "abcd", "middle"], "'middle' is not a valid integer"),
            (["move", "abcd", "tape"], "Invalid value for 'TIER': 'tape' is not one of"),
            # The tier comes last: one hash alone is a tier missing, not hashes missing.
            (["move", "abcd"], "Invalid value for 'TIER': 'abcd' is not one of"),
            (["move"], "Missing argument 'TIER'. Choose from: gpu, cpu, disk (see"),
            (["move", "disk"], "Missing argument 'HASH...'. (see"),
            (["load", "--split", "0", "x.txt"], "'--split': 0 is not in the range x>=1"),
            (
                ["generate", "hi", "--temperature", "-1"],
                "'--temperature': -1.0 is not in the range",
            ),
            # The demo refuses it before it clears the context.
            (["demo", "--max-tokens", "0"], "'--max-tokens': 0 is not in the range x>=1"),
            (["auto", "maybe"], "'maybe' is not one of 'on', 'off'"),
            (["tree", "--format", "svg"], "'svg' is not one of 'text', 'dot'"),
            (["no-such-command"], "No such command 'no-such-command'."),
        ]
    ),
)
def test_usage_errors_are_one_line_with_status_2(args, says, tmp_path):
    result = invoke(args, tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert says in lines[0] and "--help" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    by_command_line(
        [
            (["chat", "--presence-penalty", "5"], "presence_penalty must be between -2 and 2"),
            (["--recompute", "0.3", "--mode", "exact", "chat"], "applies to realign only"),
            (["--recompute", "5", "mode"], "recompute must be from 0 to 1"),
            (["--mode", "exact", "--recompute", "0.3", "mode"], "applies to realign only"),
            (["--recompute", "2", "generate", "Hi"], "recompute must be from 0 to 1"),
            (["--mode", "reuse", "--recompute", "0.3", "generate", "Hi"], "realign only"),
            # A negative fraction is the setting's value to refuse, not an unknown option.
            (["mode", "realign", "-0.1"], "recompute must be from 0 to 1"),
            (["generate", " "], "empty prompt"),
            # One run's options next to the context's setting: neither is dropped silently.
            (["--recompute", "0.5", "mode", "realign"], "is set by `mode realign` alone"),
            (["--mode", "exact", "mode", "reuse", "0.2"], "is set by `mode reuse 0.2` alone"),
        ]
    ),
)
def test_what_a_generation_refuses_is_refused_before_the_model_loads(args, message, tmp_path):
    """Options a generation would refuse are refused before the model loads (a chat would
    start, and fail at every prompt), and before `mode` shows them as if they held."""
    result = invoke(args, tmp_path)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert result.stdout == "" and not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["compose", "abcd1234", "abcd5678"],
        ["split", "abcd1234", "3"],
        ["delete", "abcd1234"],
        ["populate", "abcd1234"],
        ["move", "abcd1234", "cpu"],
        ["prefetch", "abcd1234"],
        ["export", "abcd1234", "out.kvc"],
    ],
    ids=lambda args: args[0],
)
def test_an_unknown_hash_is_refused_before_the_model_loads(args, tmp_path):
    result = invoke(["--model", str(tmp_path / "no-model"), *args], tmp_path)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines == ["error: no chunk has hash or prefix 'abcd1234'"]


def test_mode_says_when_this_runs_fraction_is_not_the_contexts(tmp_path):
    result = invoke(["--recompute", "0.5", "mode"], tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "mode: realign (recompute 0.5) for this session "
        "(the context's setting is realign (recompute 0.15))\n"
    )


def test_the_model_conversion_draws_its_progress_on_stderr(capfd):
    """stdout is the command's output: with --json, one JSON document, even on first use."""
    bar = StepBar()
    bar.step("converting the model", 1, 3)
    bar.close()
    out, err = capfd.readouterr()
    assert out == "" and "converting the model" in err


def test_bad_files_are_refused_before_the_model_loads(tmp_path):
    home = tmp_path / "home"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02text")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    cases = {
        tmp_path / "missing.txt": "no such file",
        tmp_path: f"{tmp_path} is a directory; give its text files, as in {tmp_path}/*.txt",
        empty: "is empty",
        binary: "looks binary",
        latin: "not UTF-8",
    }
    for path, message in cases.items():
        result = invoke(["load", str(path)], home)
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not home.exists()  # no registry was started, nothing was written


def test_load_hands_the_file_over_by_its_absolute_path(tmp_path, monkeypatch):
    """On a cluster a worker reads the file, from a folder of its own, where a relative path
    would name another file or none."""
    from kvchunks import ChunkInfo
    from kvchunks.cli.state import State

    monkeypatch.chdir(tmp_path)
    Path("note.txt").write_text("A note.")
    given = []

    class Client:  # the Ray client's load_file, as a cluster's worker would be asked
        def load_file(self, path, **_):
            given.append(path)
            return ChunkInfo(hash="a" * 64, content_hash="b" * 64, token_ids=[1], text="A note.")

        def close(self) -> None:
            pass

    state = State(home=tmp_path / "home")
    state._manager = Client()
    result = CliRunner().invoke(cli, ["load", "note.txt"], obj=state)
    assert result.exit_code == 0, result.output
    assert given == [Path.cwd() / "note.txt"]


def test_bench_lists_runs_and_refuses_unknown_names():
    listed = invoke(["bench"])
    assert listed.exit_code == 0 and "engine" in listed.output.split()
    unknown = invoke(["bench", "nope"])
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: no benchmark 'nope'; available: ")
    assert "engine" in unknown.stderr
    helped = invoke(["bench", "engine", "--help"])  # the options after NAME are the bench's
    assert helped.exit_code == 0, helped.output
    assert "--prefill-tokens" in helped.output


@pytest.mark.parametrize(
    "args",
    [
        ["http", "--host", "0.0.0.0"],
        ["http", "--host", "example.org", "--port", "8001"],
        ["serve", "--http", "8001", "--host", "10.1.2.3"],
    ],
)
def test_http_refuses_to_listen_beyond_loopback_without_a_key(args, tmp_path, monkeypatch):
    monkeypatch.delenv("KVCHUNKS_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), *args])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "without an API key" in result.output
