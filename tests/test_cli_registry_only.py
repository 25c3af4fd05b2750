"""The registry-only commands, each in a new process as a user runs them: they answer from the
registry and never import torch, transformers or Ray (the model folder holds only config.json,
so anything that tried to load it would fail too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_catalog import model_folder, record

from kvchunks import open_catalog
from kvchunks.common import DtypeMismatch

HEAVY = ("torch", "transformers", "ray")
# Runs the command line, then reports on stderr which heavy modules the process imported.
WRAPPER = f"""
import atexit, sys
atexit.register(lambda: print("heavy:", *[m for m in {HEAVY!r} if m in sys.modules],
                              file=sys.stderr))
from kvchunks.cli.main import main
sys.argv[0] = "kvchunks"
main()
"""


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A data directory with a document, a question after it and a note; a model folder."""
    home = tmp_path_factory.mktemp("home")
    model = model_folder(tmp_path_factory.mktemp("model"), window=8192)
    doc = record(list(range(1, 41)), text="the vault's code is 4817", tags=["facts"])
    question = record([7, 8, 9], doc, role="user", text="what is the code?")
    note = record(list(range(50, 80)), text="tea at five")
    # Kept open, as a chat in another process would: the commands share its Redis server.
    catalog = open_catalog(model, home=home)
    for chunk in (doc, question, note):
        catalog.registry.put(chunk)
    yield home, model, {"doc": doc.hash, "question": question.hash, "note": note.hash}
    catalog.close()


def kvchunks(stored, *args: str, status: int = 0, env: dict | None = None) -> str:
    """The command's stdout (with status 0) or its one line of stderr (else)."""
    home, model, _ = stored
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, "--data-dir", str(home), "--model", str(model), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})},
    )
    assert done.returncode == status, (args, done.stdout, done.stderr)
    *lines, heavy = done.stderr.splitlines()
    assert heavy == "heavy:", (args, done.stderr)
    if status:
        assert done.stdout == "" and len(lines) == 1, (args, done.stdout, done.stderr)
        return lines[0]
    return done.stdout


def test_list_info_tree_and_help(stored):
    hashes = stored[2]
    listed = json.loads(kvchunks(stored, "list", "--json"))
    assert [c["hash"] for c in listed] == list(hashes.values())
    assert {c["tier"] for c in listed} == {"disk"}  # the registry's: no pool in this process
    info = json.loads(kvchunks(stored, "info", hashes["doc"][:8], "--json"))
    assert info["children"] == info["continued_by"] == [hashes["question"]]
    assert "vault" in kvchunks(stored, "info", hashes["doc"])
    assert hashes["question"][:12] in kvchunks(stored, "tree")
    assert "list" in kvchunks(stored, "--help")


def test_a_listing_80_columns_wide_shows_what_each_chunk_is_and_its_text(stored):
    hashes = stored[2]
    listed = kvchunks(stored, "list", env={"COLUMNS": "80"}).splitlines()
    rows = {h: next(line for line in listed if h[:12] in line) for h in hashes.values()}
    assert all(len(line) == 80 for line in rows.values()), rows
    doc, question = rows[hashes["doc"]], rows[hashes["question"]]
    assert "document" in doc and "the vault's code" in doc, doc
    assert "prompt" in question and "what is the code" in question, question


def test_tag_activate_deactivate_context(stored):
    hashes = stored[2]
    assert "tags: later" in kvchunks(stored, "tag", hashes["note"], "later")
    again = kvchunks(stored, "tag", hashes["note"], "later")
    assert again.strip() == f"{hashes['note'][:12]} already had tag 'later'; tags: later"
    assert "untagged" in kvchunks(stored, "tag", hashes["note"], "later", "--remove")
    absent = kvchunks(stored, "tag", hashes["note"], "later", "--remove")
    assert absent.strip() == f"{hashes['note'][:12]} had no tag 'later'; tags: none"
    tagged = json.loads(kvchunks(stored, "tag", hashes["note"], "soon", "--json"))
    assert tagged["tags"] == ["soon"] and tagged["type"] == "document"  # --json: no torch
    # One chunk named twice (by two prefixes) is activated, and reported, once.
    activated = kvchunks(stored, "activate", hashes["doc"][:8], hashes["note"], hashes["doc"])
    assert [line.split()[0] for line in activated.splitlines()] == ["activated"] * 2 + ["2"]
    assert activated.splitlines()[-1] == "2 active, 70 of 8192 tokens"
    context = json.loads(kvchunks(stored, "context", "--json"))
    assert [c["hash"] for c in context["chunks"]] == [hashes["doc"], hashes["note"]]
    reordered = json.loads(kvchunks(stored, "reorder", hashes["note"][:8], hashes["doc"], "--json"))
    assert [c["hash"] for c in reordered["chunks"]] == [hashes["note"], hashes["doc"]]
    refused = kvchunks(stored, "reorder", hashes["note"], status=1)
    assert refused == "error: the new order must list every active chunk of the context once"
    deactivated = kvchunks(stored, "deactivate", hashes["note"], hashes["note"][:8])
    assert deactivated.count("deactivated") == 1, deactivated
    # What was so already is said to be, not to have been done.
    again = kvchunks(stored, "deactivate", hashes["note"]).splitlines()[0]
    assert again.startswith(f"not active {hashes['note'][:12]}"), again
    mixed = kvchunks(stored, "activate", hashes["doc"], hashes["note"]).splitlines()
    assert [line.split()[0] for line in mixed] == ["already", "activated", "2"], mixed
    kvchunks(stored, "deactivate", hashes["note"])
    assert "mode: reuse" in kvchunks(stored, "mode", "reuse")
    assert "auto-activate: off" in kvchunks(stored, "auto")
    settings = json.loads(kvchunks(stored, "auto", "--json"))
    assert (settings["mode"], settings["auto_activate"]) == ("reuse", False)
    assert json.loads(kvchunks(stored, "mode", "--json")) == settings
    assert "deactivated 1 chunk(s)" in kvchunks(stored, "clear")
    [on] = json.loads(kvchunks(stored, "activate", hashes["question"], "--json"))
    assert on["is_active"] and on["type"] == "prompt"
    assert json.loads(kvchunks(stored, "clear", "--json"))["chunks"] == []


def test_activate_refuses_a_chunk_of_another_dtype_as_the_engine_does(stored):
    home, model, _ = stored
    half = record([5, 6, 7], text="computed in bfloat16", metadata={"dtype": "bfloat16"})
    engine_says = DtypeMismatch(f"chunk {half.hash[:12]}", "bfloat16", "float32")
    with open_catalog(model, home=home) as catalog:
        catalog.registry.put(half)
        try:
            before = catalog.context().chunks
            refused = kvchunks(stored, "activate", half.hash, status=1)
            assert refused == f"error: {engine_says}" and catalog.context().chunks == before
            # All or none, and "none" leaves a chunk that was active before it active.
            doc = stored[2]["doc"]
            kvchunks(stored, "activate", doc)
            kvchunks(stored, "activate", doc, half.hash, status=1)
            assert [c.hash for c in catalog.context().chunks] == [doc]
            kvchunks(stored, "deactivate", doc)
            assert "activated" in kvchunks(stored, "--dtype", "bfloat16", "activate", half.hash)
            kvchunks(stored, "deactivate", half.hash)
            assert "activated" in kvchunks(
                stored, "activate", half.hash, env={"KVCHUNKS_DTYPE": "bfloat16"}
            )
            kvchunks(stored, "deactivate", half.hash)
        finally:
            catalog.registry.delete(half.hash)


def test_a_new_data_directory_reads_the_default_models_window_without_converting_it(tmp_path):
    """The default model not prepared yet: its window comes from the GGUF file's header, and
    nothing converts it (that is the first command that loads the model). Reading the header
    builds the whole vocabulary, so the window is kept: the next command reads no GGUF."""
    home = tmp_path / "new"
    env = {k: v for k, v in os.environ.items() if k != "KVCHUNKS_MODEL"}
    watch = WRAPPER.replace(repr(HEAVY), repr((*HEAVY, "gguf")))
    for read_gguf in (True, False):
        done = subprocess.run(
            [sys.executable, "-c", watch, "--data-dir", str(home), "context", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "NO_COLOR": "1"},
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["window"] == 8192
        assert done.stderr.splitlines()[-1] == ("heavy: gguf" if read_gguf else "heavy:")
    assert not (home / "models" / "SmolLM2-135M-Instruct").exists()


def test_export_and_import_refuse_a_bad_path_before_the_model_loads(stored, tmp_path):
    """The model folder holds only config.json and torch is never imported: the path is
    checked first, as it would be after loading, and refused with the same line."""
    home, _, hashes = stored
    missing = tmp_path / "no-such-dir" / "doc.kvc"
    refused = kvchunks(stored, "export", hashes["doc"], str(missing), status=1)
    assert refused == f"error: directory {missing.parent} does not exist"
    refused = kvchunks(stored, "export", hashes["doc"], "../outside.kvc", status=1)
    assert refused.startswith("error: ../outside.kvc leaves the exports directory")
    refused = kvchunks(stored, "import", "never-written.kvc", status=1)
    assert refused == f"error: chunk file {home / 'exports' / 'never-written.kvc'} does not exist"


def test_a_deleted_context_is_forgotten_and_its_chunks_stay(stored):
    home, model, hashes = stored
    kvchunks(stored, "--context", "gone", "mode", "reuse")
    kvchunks(stored, "--context", "gone", "activate", hashes["note"])
    deleted = kvchunks(stored, "--context", "gone", "context", "--delete")
    assert (
        deleted.splitlines()[0] == "deleted context 'gone' (1 chunk(s) were active; none deleted)"
    )
    with open_catalog(model, home=home, context="gone") as catalog:
        assert "gone" not in catalog.registry.contexts()
        assert catalog.context().chunks == [] and catalog.settings["mode"] == "realign"
        assert catalog.get_chunk(hashes["note"]).hash == hashes["note"]
