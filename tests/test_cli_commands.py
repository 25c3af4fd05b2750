"""The `kvchunks` subcommands, run in this process on one open ContextManager (the model
loads once): --json documents, and bad inputs that give one line, exit 1 and change nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from kv_files import raw_header, with_record, write_raw
from rich.console import Console

from kvchunks.cli import progress
from kvchunks.cli.chat import Chat
from kvchunks.cli.main import cli
from kvchunks.cli.state import State
from kvchunks.engine import SamplingParams
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.hashing import content_hash
from kvchunks.store.kv_file import read_kv_file, write_kv_file


class OpenState(State):
    """Keeps its manager open between invocations (each would otherwise load the model)."""

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def state(tmp_path_factory, model_path):
    opened = OpenState(model=str(model_path), home=tmp_path_factory.mktemp("cli_home"))
    yield opened
    State.close(opened)


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_files") / "vault.txt"
    path.write_text("The secret code of the vault is 4817.\n")
    return path


def kvchunks(state: State, *args: str, status: int = 0):
    state.mode = state.recompute = None  # this run's options, as a new process starts
    result = CliRunner().invoke(cli, list(args), obj=state, env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == status, (args, result.output, result.exception)
    return result


def as_json(state: State, *args: str):
    return json.loads(kvchunks(state, *args, "--json").stdout)


def snapshot(state: State) -> tuple:
    return as_json(state, "list"), as_json(state, "context")


def test_load_activate_generate_as_json(state, doc):
    [chunk] = as_json(state, "load", str(doc), "--tag", "vault", "--activate")
    assert chunk["is_active"] and chunk["tags"] == ["vault"] and chunk["role"] == "system"
    assert chunk["metadata"]["source"] == str(doc) and chunk["token_count"] > 5
    context = as_json(state, "context")
    assert [c["hash"] for c in context["chunks"]] == [chunk["hash"]]
    assert context["token_count"] == chunk["token_count"] and context["window"] == 8192
    answer = as_json(
        state, "generate", "What is the secret code of the vault?", "--max-tokens", "16"
    )
    assert "4817" in answer["text"] and answer["interrupted"] is False
    assert answer["output_chunk"]["parent_chunks"] == [
        chunk["hash"],
        answer["prompt_chunk"]["hash"],
    ]
    assert answer["output_chunk"]["generation_params"]["max_tokens"] == 16
    assert answer["ttft_s"] > 0 and answer["token_count"] > 0
    assert answer["mode"] == "realign" and answer["tokens_recomputed"] == 0  # one timeline
    assert answer["tokens_reused"] == chunk["token_count"]

    streamed = kvchunks(state, "generate", "Say hello.", "--max-tokens", "4")
    assert streamed.stdout.strip() and "[prompt " not in streamed.stdout  # the answer only
    assert streamed.stderr.startswith("[prompt ")  # the footer names the chunks, on stderr
    footer = f"realign (recompute 0.15) · {chunk['token_count']} reused, 0 recomputed"
    assert footer in streamed.stderr
    refused = kvchunks(state, "--mode", "exact", "--recompute", "0.2", "generate", "Hi", status=1)
    assert "applies to realign only" in refused.stderr


def test_compose_split_tag_info_export_import(state, doc, tmp_path):
    [chunk] = as_json(state, "list", "--tag", "vault")
    h = chunk["hash"]
    note = tmp_path / "note.txt"
    note.write_text("Tea is served at five.\n")
    [other] = as_json(state, "load", str(note))
    view = as_json(state, "compose", h[:8], other["hash"][:8], "--tag", "pair")
    assert view["kind"] == "composed" and view["tags"] == ["pair"]
    assert view["token_count"] == chunk["token_count"] + other["token_count"]
    head, tail = as_json(state, "split", h, "4")
    assert (head["token_count"], tail["token_count"]) == (4, chunk["token_count"] - 4)
    assert "tags: vault, facts" in kvchunks(state, "tag", h, "facts").stdout
    assert "tags: vault" in kvchunks(state, "tag", h, "facts", "--remove").stdout
    moved = kvchunks(state, "move", view["hash"], "gpu").stdout
    kv_of = f"{h[:12]}, {other['hash'][:12]}"
    assert moved == f"moved {view['hash'][:12]} (a view: the KV of {kv_of}) to gpu\n"
    info = as_json(state, "info", h[:6])
    assert {view["hash"], head["hash"], tail["hash"]} <= set(info["children"])
    assert info["token_ids"] and info["parents"] == []
    shown = kvchunks(state, "info", h).stdout
    assert "blocks [" in shown
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["metadata"]["timestamp"]))
    assert f"timestamp: {when}" in shown and "combine:" not in shown  # standalone: none

    target = tmp_path / "other.kvc"
    assert str(target) in kvchunks(state, "export", other["hash"], str(target)).stdout
    kvchunks(state, "export", other["hash"], str(target), status=1)  # exists, no --force
    kvchunks(state, "export", other["hash"], str(target), "--force")
    deleted = kvchunks(state, "delete", other["hash"], "--cascade").stdout
    assert other["hash"][:12] in deleted and view["hash"][:12] in deleted  # its view went too
    assert as_json(state, "list", "Tea") == []
    assert as_json(state, "import", str(target))["hash"] == other["hash"]


def test_move_populate_mode_auto_clear(state):
    h = as_json(state, "list", "--tag", "vault")[0]["hash"]
    assert kvchunks(state, "move", h, h[:8], "disk").stdout.count("to disk") == 1  # one chunk
    assert "to gpu" in kvchunks(state, "move", h, "gpu").stdout
    assert "on gpu" in kvchunks(state, "populate", h).stdout
    assert "prefetching" in kvchunks(state, "prefetch", h).stdout
    assert kvchunks(state, "mode", "realign").stdout == "mode: realign (recompute 0.15)\n"
    assert kvchunks(state, "mode", "realign", "0.3").stdout == "mode: realign (recompute 0.3)\n"
    assert as_json(state, "context")["mode"] == "realign"
    assert as_json(state, "context")["recompute"] == 0.3
    for bad in (["exact", "0.2"], ["realign", "1.5"], ["reuse", "0"]):
        done = kvchunks(state, "mode", *bad, status=1)
        assert done.stderr.count("\n") == 1 and "recompute" in done.stderr
    assert as_json(state, "context")["recompute"] == 0.3  # unchanged by the refusals
    kvchunks(state, "mode", "reuse")
    assert as_json(state, "context")["recompute"] is None
    assert kvchunks(state, "auto", "on").stdout == "auto-activate: on\n"
    assert as_json(state, "context")["auto_activate"] is True
    answer = as_json(state, "generate", "Say hi.", "--max-tokens", "4")
    assert answer["prompt_chunk"]["is_active"] and answer["output_chunk"]["is_active"]
    kvchunks(state, "auto", "off")
    assert "deactivated 3 chunk(s)" in kvchunks(state, "clear").stdout
    assert as_json(state, "context")["chunks"] == []
    assert "activated" in kvchunks(state, "activate", h).stdout


def test_moving_several_chunks_reports_bytes_and_shows_a_bar(state, tmp_path, monkeypatch):
    notes = []
    for i in range(2):
        (tmp_path / f"n{i}.txt").write_text(f"Note {i}: the lighthouse keeper counts {i} gulls.\n")
        notes += as_json(state, "load", str(tmp_path / f"n{i}.txt"))
    hashes = [n["hash"] for n in notes]
    seen = []
    moved = state.manager.move_chunks(hashes, "disk", on_progress=lambda *d: seen.append(d))
    sizes = [state.manager.store.model.kv_bytes(n["token_count"]) for n in notes]
    assert seen == [(0, sum(sizes)), (sizes[0], sum(sizes)), (sum(sizes), sum(sizes))]
    assert [c.tier for c in moved] == ["disk", "disk"]
    monkeypatch.setattr(
        state, "err", Console(file=io.StringIO(), force_terminal=True, color_system=None, width=160)
    )
    lines = kvchunks(state, "move", *hashes, "cpu").stdout.splitlines()
    assert lines == [f"moved {h[:12]} to cpu" for h in hashes]
    drawn = state.err.file.getvalue()
    assert "moving 2 chunks" in drawn and "100%" in drawn and "B/s" in drawn
    assert {c["tier"] for c in as_json(state, "list", "lighthouse")} == {"cpu"}
    kvchunks(state, "move", hashes[0], "gpu")  # one chunk: no bar
    assert state.err.file.getvalue() == drawn


def test_loading_a_stored_file_again_says_so(state, tmp_path):
    note = tmp_path / "again.txt"
    note.write_text("The ferry leaves at nine.\n")
    [first] = as_json(state, "load", str(note))
    assert first["already_stored"] is False
    [second] = as_json(state, "load", str(note))
    assert second["already_stored"] is True and second["hash"] == first["hash"]
    line = kvchunks(state, "load", str(note)).stdout
    assert line.startswith(f"loaded {first['hash'][:12]}") and "already stored" in line


def test_load_takes_several_files_in_order(state, tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("The tram to Ropsten runs every twelve minutes.\n")
    second.write_text("The tram depot at Ropsten burned down in 1971.\n")
    result = kvchunks(state, "load", str(first), str(second), "--tag", "tram")
    lines = result.stdout.splitlines()
    chunks = as_json(state, "list", "--tag", "tram")
    assert [c["text"].strip() for c in chunks] == [
        first.read_text().strip(),
        second.read_text().strip(),
    ]
    hashes = [c["hash"][:12] for c in chunks]
    assert [line.split()[1] for line in lines[:2]] == hashes
    assert lines[0].endswith(f"from {first}") and lines[1].endswith(f"from {second}")
    assert lines[2] == f"not active: activate {' '.join(hashes)} for the model to see them"
    lines = kvchunks(state, "load", str(first), "--activate").stdout.splitlines()
    assert len(lines) == 1 and ", active from" in lines[0]  # nothing to activate: no advice
    for chunk in chunks:
        kvchunks(state, "delete", chunk["hash"])


def test_load_stops_at_a_file_too_long_and_names_what_it_kept(state, tmp_path):
    fits, too_long = tmp_path / "fits.txt", tmp_path / "long.txt"
    fits.write_text("The canal lock at Hammarby opens at dawn.\n")
    too_long.write_text("word " * (state.manager.store.model.window + 100))
    before = snapshot(state)
    missing = kvchunks(state, "load", str(fits), str(tmp_path / "missing.txt"), status=1)
    assert "no such file" in missing.stderr and snapshot(state) == before  # checked first
    refused = kvchunks(state, "load", str(fits), str(too_long), status=1)
    [kept] = as_json(state, "list", "canal lock")
    line = refused.stderr.strip()
    assert "\n" not in line and "exceed the context window" in line
    assert line.endswith(
        f"loaded before it: {kept['hash'][:12]} ({kept['token_count']} tokens, document)"
    )
    kvchunks(state, "delete", kept["hash"])
    assert snapshot(state) == before


def test_a_long_load_shows_tokens_done_total_and_rate(state, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LARGE_FILE", 0)  # every file counts as large here
    monkeypatch.setattr(
        state, "err", Console(file=io.StringIO(), force_terminal=True, color_system=None, width=160)
    )
    text = tmp_path / "parts.txt"
    text.write_text("".join(f"Paragraph {i} is about the harbour.\n\n" for i in range(6)))
    parts = as_json(state, "load", str(text), "--split", "12")
    total = sum(p["token_count"] for p in parts)
    drawn = state.err.file.getvalue()
    assert f"{total}/{total} tokens" in drawn and "100%" in drawn and "tokens/s" in drawn


def test_bad_inputs_give_one_line_exit_1_and_change_nothing(state, tmp_path):
    cm = state.manager
    small = as_json(state, "list", "--tag", "vault")[0]
    inactive = next(c for c in as_json(state, "list") if not c["is_active"])
    # Views that fit the window alone, but not together after the active vault document.
    assert small["is_active"]
    copies = (cm.store.model.window - cm.store.composer.opening_length) // small["token_count"]
    big = as_json(state, "compose", *[small["hash"]] * copies)
    pair = as_json(state, "compose", small["hash"], small["hash"])
    twin = small["hash"][:4] + ("0" if small["hash"][4] != "0" else "1") * 60
    cm.registry.put(ChunkInfo(hash=twin, content_hash=content_hash([1]), token_ids=[1]))
    existing = tmp_path / "taken.kvc"
    existing.write_bytes(b"")
    corrupt = tmp_path / "corrupt.kvc"
    corrupt.write_bytes(b"\x00" * 64)
    bad_files = chunk_files_gone_bad(state, small["hash"], tmp_path)
    texts = text_files_gone_bad(tmp_path, cm.store.model.window)
    before = snapshot(state)
    cases = {
        ("info", "ffff0000"): "no chunk has hash or prefix",
        ("info", small["hash"][:4]): f"matches {min(small['hash'], twin)[:12]}",
        ("activate", pair["hash"], big["hash"]): "over the context window of 8192",
        ("activate", inactive["hash"], big["hash"]): "over the context window",  # all or none
        ("compose", *[small["hash"]] * (copies + 1)): "compose fewer chunks, or shorter ones",
        ("deactivate", small["hash"], "ffff0000"): "no chunk has hash",
        ("move", small["hash"], "ffff0000", "disk"): "no chunk has hash",  # all or none
        ("delete", small["hash"]): "is used by view(s)",
        ("split", small["hash"], "0"): "split point must be between 1 and",
        ("split", small["hash"], "-1"): "split point must be between 1 and",
        ("compose", small["hash"]): "compose needs at least two chunks",
        ("tag", small["hash"], "two words"): "invalid tag",
        ("export", small["hash"], str(existing)): "exists; overwrite it with force=True (--force)",
        ("export", small["hash"], "../outside.kvc"): "leaves the exports directory",
        ("export", big["hash"], "big.kvc"): "a view has no KV of its own",
        ("import", str(corrupt)): "has an unreadable header",
        ("import", str(tmp_path / "missing.kvc")): "does not exist",
        **{("import", str(path)): message for path, message in bad_files.items()},
        **{("load", str(path)): message for path, message in texts.items()},
        ("generate", " "): "empty prompt",
        ("--context", "no/such", "list"): "invalid context name",
        ("generate", "Hi", "--max-tokens", "9000"): "exceed the context window",
        ("list", "--tag", "two words"): "invalid tag",
    }
    try:
        usage = {  # click's checks: exit 2, as for any usage error
            ("generate", "Hi", "--temperature", "-1"): "is not in the range x>=0",
            ("generate", "Hi", "--top-p", "0"): "is not in the range 0<x<=1",
            ("generate", "Hi", "--max-tokens", "0"): "is not in the range x>=1",
            ("move", "disk"): "Missing argument 'HASH...'",
        }
        for args, message in [*cases.items(), *usage.items()]:
            for json_flag in ([], ["--json"]):  # with --json too: no JSON, the same line
                result = kvchunks(state, *args, *json_flag, status=2 if args in usage else 1)
                lines = result.stderr.splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
                assert message in lines[0], (args, lines[0])
                assert result.stdout == ""
        assert snapshot(state) == before
    finally:
        cm.registry.delete(twin)


def chunk_files_gone_bad(state: State, chunk_hash: str, at: Path) -> dict[Path, str]:
    """Exports of one chunk, each damaged one way, and what importing it must say."""
    good = at / "good.kvc"
    kvchunks(state, "export", chunk_hash, str(good))
    k, v, record, _ = read_kv_file(good)
    store = state.manager.store
    files: dict[Path, str] = {}

    def bad(name: str, message: str) -> Path:
        files[at / name] = message
        return at / name

    bad("truncated.kvc", "truncated").write_bytes(good.read_bytes()[:-100])
    write_kv_file(bad("other-model.kvc", "another model"), k, v, record, "0" * 64)
    write_kv_file(
        bad("bf16.kvc", "computed in bfloat16 and this model runs in float32; run with --dtype"),
        k.bfloat16(),
        v.bfloat16(),
        record,
        store.model.fingerprint,
    )
    narrow = k[..., :32].contiguous(), v[..., :32].contiguous()
    write_kv_file(bad("shape.kvc", "shape"), *narrow, record, store.model.fingerprint)
    header, body = raw_header(good)
    header["__metadata__"]["sha256"] = "0" * 64  # well-formed, but not the data's
    write_raw(bad("forged.kvc", "fails the SHA-256 check"), header, body)
    huge = good.read_bytes()
    bad("huge-header.kvc", "header").write_bytes((1 << 60).to_bytes(8, "little") + huge[8:])
    shutil.copy(good, bad("huge-count.kvc", "record"))
    with_record(at / "huge-count.kvc", record | {"token_count": 1 << 40})
    shutil.copy(good, bad("wrong-types.kvc", "record"))
    with_record(at / "wrong-types.kvc", record | {"token_ids": "not a list", "tags": 5})
    return files


def text_files_gone_bad(at: Path, window: int) -> dict[Path, str]:
    files = {
        at / "missing.txt": "no such file",
        at / "empty.txt": "is empty",
        at / "binary.bin": "looks binary",
        at / "latin1.txt": "is not UTF-8",
        at / "too-long.txt": "exceed the context window of 8192 by 111; load it in parts of at "
        "most N tokens with --split N",
    }
    (at / "empty.txt").write_text(" \n")
    (at / "binary.bin").write_bytes(b"\x00\x01\x02 abc")
    (at / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (at / "too-long.txt").write_text("word " * (window + 100))
    return files


@pytest.fixture
def context_kept(state):
    """The context's active chunks put back as they were, for a test that changes them."""
    before = [c["hash"] for c in as_json(state, "context")["chunks"]]
    yield
    kvchunks(state, "clear")
    if before:
        kvchunks(state, "activate", *before)


def plain_consoles(state: State, monkeypatch) -> tuple[io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(state, "out", Console(file=out, color_system=None, width=200))
    monkeypatch.setattr(state, "err", Console(file=err, color_system=None, width=200))
    return out, err


def test_load_expands_a_home_path_in_the_command_and_the_chat(state, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tilde.txt").write_text("The lighthouse is painted red.\n")
    [chunk] = as_json(state, "load", "~/tilde.txt")
    assert chunk["metadata"]["source"] == str((tmp_path / "tilde.txt").resolve())
    out, err = plain_consoles(state, monkeypatch)
    Chat(state).handle("/load ~/tilde.txt")
    line = out.getvalue()
    assert err.getvalue() == ""
    assert line.startswith(f"loaded {chunk['hash'][:12]} (") and "already stored" in line


def test_slash_commands_take_h_for_help_as_commands_do(state, monkeypatch):
    out, err = plain_consoles(state, monkeypatch)
    Chat(state).handle("/help")  # reads every command's usage first, as a chat often does
    for line in ("/list -h", "/mode --help", "/help list"):
        with contextlib.redirect_stdout(io.StringIO()) as shown:
            Chat(state).handle(line)
        assert shown.getvalue().startswith("Usage: /") and "-h, --help" in shown.getvalue()
    assert err.getvalue() == ""


def test_load_activate_past_the_window_names_the_chunk_it_kept(state, tmp_path, context_kept):
    small = as_json(state, "list", "--tag", "vault")[0]
    view = as_json(state, "context")
    opening = state.manager.store.composer.opening_length  # before the active chunks
    room = view["window"] - opening - view["token_count"]
    filler = as_json(state, "compose", *[small["hash"]] * (room // small["token_count"]))
    kvchunks(state, "activate", filler["hash"])  # less room left than one more vault
    note = tmp_path / "late.txt"
    note.write_text("The secret code of the vault is 4817, and the key is under the mat.\n")
    before = as_json(state, "context")
    refused = kvchunks(state, "load", str(note), "--activate", status=1)
    [late] = as_json(state, "list", "under the mat")
    line = refused.stderr.strip()
    assert "\n" not in line and "over the context window of 8192" in line
    assert f"loaded all the same, not active: {late['hash'][:12]} (" in line
    assert not late["is_active"] and as_json(state, "context") == before
    kvchunks(state, "delete", late["hash"])
    kvchunks(state, "deactivate", filler["hash"])
    kvchunks(state, "delete", filler["hash"])


def test_ctrl_c_keeps_the_partial_answer_and_exits_130(state, monkeypatch, context_kept):
    from kvchunks.cli import context_commands

    shown = []

    def stopped(text: str) -> None:
        shown.append(text)
        if len(shown) == 3:  # Ctrl-C while the answer streams
            raise KeyboardInterrupt

    monkeypatch.setattr(context_commands, "stream", stopped)
    done = kvchunks(state, "generate", "Count to twenty.", "--max-tokens", "12", status=130)
    assert "interrupted; partial answer kept" in done.stderr
    answers = [c for c in as_json(state, "list") if c["metadata"].get("interrupted")]
    assert answers and answers[-1]["type"] == "answer"

    def before_any_token(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(state.manager, "generate", before_any_token)
    done = kvchunks(state, "generate", "Count to twenty.", status=130)
    assert done.stderr == "error: interrupted\n" and done.stdout == ""


def test_demo_prints_the_answer_as_written_in_the_mode_asked(
    state, monkeypatch, context_kept, tmp_path
):
    note = tmp_path / "aside.txt"
    note.write_text("An aside the demo's question must not read.\n")
    [aside] = as_json(state, "load", str(note), "--activate")
    cm = state.manager
    generate = cm.generate
    asked = {}

    def bracketed(*args, **kwargs):
        asked.update(kwargs)
        return dataclasses.replace(generate(*args, **kwargs), text="a [/i] b [red]c[/red]")

    monkeypatch.setattr(cm, "generate", bracketed)
    shown = kvchunks(state, "--mode", "exact", "demo", "--max-tokens", "2").stdout
    assert "answer   a [/i] b [red]c[/red]\n" in shown
    assert "question What is the name of the night ferry" in shown
    assert asked["mode"] == "exact" and f"active in context '{state.context}'" in shown
    # What was active made way for the document, and the line says how to put it back.
    assert f"context '{state.context}': kvchunks activate " in shown
    assert aside["hash"][:12] in shown.split("deactivated", 1)[1].splitlines()[0]
    assert [c["type"] for c in as_json(state, "context")["chunks"]] == ["document"]
    assert aside["hash"] not in {c["hash"] for c in as_json(state, "context")["chunks"]}


# -- --json prints what the REST API returns --------------------------------------------------


@pytest.fixture(scope="module")
def http(state):
    """The REST API over the commands' own chunk store, in this process: a command's --json
    must print what the route doing the same returns."""
    from fastapi.testclient import TestClient

    from kvchunks.server.app import create_app
    from kvchunks.server.backend import LocalBackend

    with TestClient(create_app(LocalBackend(state.manager))) as client:
        yield client


def stored(http, chunk_hash: str) -> dict:
    """The chunk as every chunk route returns it (GET adds only its token ids)."""
    document = http.get(f"/v1/chunks/{chunk_hash}").json()
    del document["token_ids"]
    return document


@pytest.fixture
def bell(state, tmp_path):
    note = tmp_path / "bell.txt"
    note.write_text("The church bell rings twelve times at noon.\n")
    [chunk] = as_json(state, "load", str(note))
    yield chunk
    kvchunks(state, "delete", chunk["hash"], "--cascade")


def test_chunk_documents_have_the_type_the_routes_give(state, http, bell):
    h = bell["hash"]
    assert bell.pop("already_stored") is False and bell == stored(http, h)
    assert bell["type"] == "document"
    info = as_json(state, "info", h)
    route = http.get(f"/v1/chunks/{h}").json()
    assert {k: info[k] for k in route} == route  # info adds the hashes of its provenance
    listed = http.get("/v1/chunks", params={"pattern": "church bell"}).json()["data"]
    assert as_json(state, "list", "church bell") == [
        {k: v for k, v in c.items() if k != "follows"} for c in listed
    ]
    vault = as_json(state, "list", "--tag", "vault")[0]
    view = as_json(state, "compose", h, vault["hash"])
    head, tail = as_json(state, "split", h, "3")
    for made, kind in ((view, "composed"), (head, "split"), (tail, "split")):
        assert made["type"] == kind and made == stored(http, made["hash"])


def test_chunk_changes_print_what_the_routes_return(state, http, bell, tmp_path):
    h = bell["hash"]
    added = http.post(f"/v1/chunks/{h}/tags", json={"add": ["bells"]}).json()
    assert as_json(state, "tag", h, "bells", "--remove")["tags"] == []
    assert as_json(state, "tag", h, "bells") == added  # the same change, the same document
    on_disk = http.post(f"/v1/chunks/{h}/move", json={"tier": "disk"}).json()
    assert [c["tier"] for c in as_json(state, "move", h, "cpu")] == ["cpu"]
    assert as_json(state, "move", h, "disk") == [on_disk]
    populated = as_json(state, "populate", h)
    assert populated["tier"] == "gpu" and populated == stored(http, h)
    assert as_json(state, "prefetch", h) == populated  # in the pool already: nothing to bring
    target = tmp_path / "bell.kvc"
    exported = as_json(state, "export", h, str(target))
    assert exported == {**populated, "path": str(target)} and target.exists()
    view = as_json(state, "compose", h, h)
    deleted = as_json(state, "delete", h, "--cascade")  # DELETE /v1/chunks/{ref}'s body
    assert list(deleted) == ["deleted"] and set(deleted["deleted"]) == {h, view["hash"]}
    imported = as_json(state, "import", str(target))
    assert imported["type"] == "document" and imported == stored(http, h)


def test_context_changes_print_what_the_routes_return(state, http, bell, context_kept):
    h = bell["hash"]
    on = http.post("/v1/contexts/default/activate", json={"chunk": h}).json()
    with contextlib.redirect_stdout(io.StringIO()) as shown:  # the chat's command too
        Chat(state).handle(f"/deactivate {h} --json")
    [off] = json.loads(shown.getvalue())
    assert not off["is_active"] and off == stored(http, h)
    assert as_json(state, "activate", h) == [on]
    context = http.get("/v1/contexts/default").json()
    assert context["chunks"][-1]["type"] == "document" and as_json(state, "context") == context
    settings = "/v1/contexts/default/settings"
    before = {k: context[k] for k in ("mode", "recompute", "auto_activate")}
    try:
        reuse = http.post(settings, json={"mode": "reuse", "auto_activate": True}).json()
        assert as_json(state, "mode", "exact")["mode"] == "exact"
        assert as_json(state, "mode", "reuse") == reuse
        assert as_json(state, "auto", "off")["auto_activate"] is False
        assert as_json(state, "auto", "on") == reuse == as_json(state, "mode")
    finally:
        http.post(settings, json=before)
    cleared = as_json(state, "clear")
    assert cleared["chunks"] == [] and cleared == http.get("/v1/contexts/default").json()


@pytest.mark.parametrize("command", ["http", "serve"])
def test_a_step_budget_below_the_running_answers_is_refused_before_anything_starts(
    command, model_path, tmp_path
):
    home = tmp_path / "home"
    fresh = State(model=str(model_path), home=home)
    args = [command, "--max-num-batched-tokens", "32"]
    result = CliRunner().invoke(cli, args, obj=fresh)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "error: max_num_batched_tokens (32) must be at least max_num_seqs (64): every running "
        "answer's next token goes in each step"
    ]
    assert not home.exists()  # no registry opened, no service asked for


def test_the_step_budget_given_is_the_engines(model_path, tmp_path):
    given = State(model=str(model_path), home=tmp_path / "home", step_tokens=128)
    try:
        assert given.manager.store.model.engine_config.max_num_batched_tokens == 128
    finally:
        given.close()


def test_info_names_the_chunks_with_the_same_text_in_other_contexts(state, doc):
    [chunk] = as_json(state, "load", str(doc))
    over_doc, over_nothing = (state.manager.with_context(n) for n in ("same-a", "same-b"))
    over_doc.activate_chunk(chunk["hash"])
    one_token = SamplingParams(temperature=0, max_tokens=1)
    first = over_doc.generate("Say hi.", one_token).prompt_chunk.hash
    second = over_nothing.generate("Say hi.", one_token).prompt_chunk.hash
    info = as_json(state, "info", first)
    assert first != second and info["same_text"] == [second]
    shown = kvchunks(state, "info", first).stdout
    assert second[:12] in shown[shown.index("same text") : shown.index("blocks")]
    assert as_json(state, "info", chunk["hash"])["same_text"] == []
