"""`kvchunks chat` end to end: the real command in a pseudo-terminal (pexpect), on the default
model, then a fresh `kvchunks list --json` that sees what the chat made.

The tests run in file order on one chat process (the model loads once): each step builds on
the chunks of the steps before it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
import pytest

KVCHUNKS = str(Path(sys.executable).with_name("kvchunks"))
PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"  # prompt_toolkit: a prompt starts / ends
PROMPT = "default>"
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>])")
SHORT = re.compile(r"[0-9a-f]{12}")
QUESTION = "What is the secret code of the vault?"
TIMEOUT = 180


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def cli_env(home: Path, model: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KVCHUNKS_HOME": str(home),
        "KVCHUNKS_MODEL": str(model),
        "NO_COLOR": "1",
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm",
        "COLUMNS": "200",
        "LINES": "50",
    }


@dataclass
class Chat:
    """A running `kvchunks chat` and what the steps learned about its chunks."""

    child: pexpect.spawn
    home: Path
    files: Path
    env: dict[str, str]
    hashes: dict[str, str] = field(default_factory=dict)

    def run(self, line: str) -> str:
        """Send one line; the output it printed before the next prompt, without escapes."""
        self.child.send(line + "\r")
        self.child.expect_exact(PASTE_OFF)
        self.child.expect_exact(PASTE_ON)
        out = clean(self.child.before)
        self.child.expect_exact(PROMPT)
        return out

    def json(self, line: str):
        out = self.run(line)
        return json.loads(out[min(i for i in (out.find("["), out.find("{")) if i >= 0) :])

    def state(self) -> tuple:
        return self.json("/list --json"), self.json("/context --json")

    def error(self, line: str) -> str:
        out = self.run(line).strip()
        assert out.startswith("error: ") and "\n" not in out, (line, out)
        return out


@pytest.fixture(scope="module")
def chat(tmp_path_factory, model_path):
    root = tmp_path_factory.mktemp("cli_chat")
    home, files = root / "home", root / "files"
    files.mkdir()
    env = cli_env(home, model_path)
    child = pexpect.spawn(
        KVCHUNKS,
        ["chat", "--max-tokens", "48"],
        cwd=str(files),
        env=env,
        dimensions=(50, 200),
        encoding="utf-8",
        timeout=TIMEOUT,
        # Started as from a terminal: a suite run as a background job of a script ignores
        # SIGINT, the chat would inherit that, and then no Ctrl-C reaches it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect_exact(PASTE_ON)
    assert "kvchunks chat · SmolLM2-135M-Instruct · context 'default'" in clean(child.before)
    child.expect_exact(PROMPT)
    yield Chat(child, home, files, env)
    child.close(force=True)


def test_load_activate_and_ask(chat):
    doc = chat.files / "vault.txt"
    doc.write_text("The secret code of the vault is 4817.\n")
    out = chat.run(f"/load {doc} --tag vault")
    assert out.startswith("loaded ") and str(doc) in out
    chat.hashes["doc"] = doc_hash = SHORT.search(out).group()
    out = chat.run(f"/activate {doc_hash[:6]}")  # a prefix works everywhere
    assert f"activated {doc_hash}" in out and "1 active" in out
    out = chat.run(QUESTION)
    assert "4817" in out
    footer = re.search(r"\[prompt ([0-9a-f]{12}) · output ([0-9a-f]{12}) · ", out)
    chat.hashes["prompt"], chat.hashes["answer"] = footer.groups()


def test_deactivate_and_ask_again(chat):
    out = chat.run(f"/deactivate {chat.hashes['doc']}")
    assert "deactivated" in out and "0 active" in out
    out = chat.run(QUESTION)
    assert "[prompt " in out and "4817" not in out


def test_ctrl_c_stops_an_answer_and_keeps_it(chat):
    # Room for a long answer: on a busy machine this process may wake up only seconds after
    # the first words, and an answer of 48 tokens could be over before the Ctrl-C is sent.
    assert "max_tokens 1000" in chat.run("/set --max-tokens 1000")
    chat.child.send("Tell me a long story about a dragon and a knight.\r")
    chat.child.expect_exact(PASTE_OFF)
    chat.child.expect(r"(\w+\W+){5}")  # some of the answer has streamed
    chat.child.sendintr()
    chat.child.expect_exact(PASTE_ON)
    out = clean(chat.child.before)
    chat.child.expect_exact(PROMPT)
    # Printed, so that a failure shows it whole, the chat's stderr included: pytest cuts a
    # long assertion message short.
    print(out)
    assert "interrupted; partial answer kept" in out
    kept = re.search(r"output ([0-9a-f]{12}) · (\d+) tokens", out)
    assert kept and int(kept.group(2)) > 0, out
    chat.hashes["partial"] = kept.group(1)
    out = chat.run("/output list")
    assert re.search(rf"{kept.group(1)} +│ answer, interrupted", out)
    assert chat.hashes["answer"] in out
    assert chat.run("/help quit").startswith("Usage: /quit")  # still chatting
    chat.run("/set --max-tokens 48")


def test_outputs_compose_split_tag_info_context(chat):
    doc, answer = chat.hashes["doc"], chat.hashes["answer"]
    out = chat.run(f"/output activate {answer}")
    assert f"activated {answer}" in out
    out = chat.run("/output tag reply")  # the last answer: the interrupted one
    assert f"tagged {chat.hashes['partial']}; tags: reply" in out
    out = chat.run(f"/compose {doc} {answer} --tag pair")
    assert out.startswith("composed ") and "from 2 chunks" in out
    chat.hashes["view"] = SHORT.search(out).group()
    out = chat.run(f"/split {doc} 5")
    head, tail = SHORT.findall(out)
    assert "(5 tokens, split)" in out
    out = chat.run(f"/tag {doc} facts")
    assert "tags: vault, facts" in out
    info = chat.run(f"/info {doc[:5]}")
    assert re.search(r"tags +vault, facts", info)
    assert re.search(r"kind +input \(standalone\)", info)
    assert "source: " in info and "vault.txt" in info
    for child in (chat.hashes["prompt"], chat.hashes["view"], head, tail):
        assert child in info  # children: the prompt computed after it and the views over it
    info = chat.run(f"/info {answer}")
    assert re.search(rf"parents +{doc}", info) and chat.hashes["prompt"] in info
    assert "temperature: 0.0" in info and "blocks [" in info
    out = chat.run(f"/activate {doc}")
    context = chat.run("/context")
    rows = [line for line in context.splitlines() if SHORT.search(line)]
    assert [SHORT.search(r).group() for r in rows] == [answer, doc]  # activation order
    assert re.search(r"2 active chunk\(s\), \d+ of 8192 tokens", context)
    stats = chat.run("/stats")
    assert re.search(r"pool +\d+ of \d+ blocks used", stats)
    assert re.search(r"chunks +\d+ \(gpu \d+, cpu \d+, disk \d+\), 2 active", stats)
    assert re.search(r"last generation +\d+ tokens, time to first token [\d.]+ s", stats)


def test_save_delete_restore(chat):
    note = chat.files / "note.txt"
    note.write_text("Tea is served at five.\n")
    note_hash = SHORT.search(chat.run(f"/load {note}")).group()
    out = chat.run(f"/save {note_hash} note.kvc")
    saved = chat.home / "exports" / "note.kvc"
    assert f"saved {note_hash} to {saved}" in out and saved.is_file()
    chat.error(f"/save {note_hash} note.kvc")  # exists: refused without --force
    assert "saved" in chat.run(f"/save {note_hash} note.kvc --force")
    assert f"deleted {note_hash}" in chat.run(f"/delete {note_hash}")
    assert note_hash not in chat.run("/list")
    out = chat.run(f"/restore {saved}")
    assert f"restored {note_hash}" in out
    assert "Tea is served at five." in chat.run(f"/info {note_hash}")


def test_move_between_tiers(chat):
    doc = chat.hashes["doc"]
    assert f"moved {doc} to disk" in chat.run(f"/move {doc} disk")
    assert re.search(r"tier +disk", chat.run(f"/info {doc}"))
    assert f"moved {doc} to cpu" in chat.run(f"/move {doc} cpu")
    assert f"moved {doc} to gpu" in chat.run(f"/move {doc} gpu")
    assert "prefetching" in chat.run(f"/prefetch {doc}")


def test_output_commands_print_json(chat):
    partial = chat.hashes["partial"]
    (tagged,) = chat.json(f"/output tag kept {partial} --json")
    assert tagged["hash"].startswith(partial) and tagged["type"] == "answer"
    assert tagged["tags"] == ["reply", "kept"]
    (activated,) = chat.json(f"/output activate {partial} --json")
    assert activated["hash"] == tagged["hash"] and activated["is_active"]
    chat.run(f"/deactivate {partial}")
    chat.run("/set --max-tokens 4")
    answer = re.search(r"output ([0-9a-f]{12})", chat.run("Say yes.")).group(1)
    chat.run("/set --max-tokens 48")
    deleted = chat.json("/output delete --json")  # the last answer
    assert len(deleted["deleted"]) == 1 and deleted["deleted"][0].startswith(answer)
    assert answer not in chat.run("/list")
    for line in ("/output tag gone", "/output activate", "/output delete"):
        assert "the last answer (or its prompt) was deleted" in chat.error(line)


def test_bad_inputs_are_one_line_and_change_nothing(chat, tmp_path):
    from kvchunks.store.chunk import ChunkInfo
    from kvchunks.store.hashing import content_hash
    from kvchunks.store.redis_server import close, connect
    from kvchunks.store.registry import ChunkRegistry

    doc, view = chat.hashes["doc"], chat.hashes["view"]
    before = chat.state()
    hashes = [c["hash"] for c in before[0]]
    unknown = next(
        p for p in (f"{i:04x}" for i in range(65536)) if not any(h.startswith(p) for h in hashes)
    )
    empty, binary, latin, long, corrupt = (
        tmp_path / n for n in ("e.txt", "b.bin", "l.txt", "long.txt", "c.kvc")
    )
    empty.write_text("\n")
    binary.write_bytes(b"\x89PNG\x00\x00")
    latin.write_bytes("café".encode("latin-1"))
    long.write_text("1234567890" * 1000)  # 10,000 tokens (digits are single tokens), 10 KB
    corrupt.write_bytes(b"not a chunk file at all")
    existing = chat.home / "exports" / "note.kvc"
    cases = {
        f"/info {unknown}": f"no chunk has hash or prefix '{unknown}'",
        f"/activate {chat.hashes['prompt']} {unknown}": "no chunk",  # all or none
        "/info zz!": "is not a chunk hash",
        "/info": "Missing argument 'HASH'",
        "/output": "a command is missing: activate, delete, list, tag (see /output --help)",
        f"/load {tmp_path / 'missing.txt'}": "no such file",
        f"/load {empty}": "is empty",
        f"/load {binary}": "looks binary",
        f"/load {latin}": "not UTF-8",
        f"/load {long}": "exceed the context window of 8192",
        f"/save {doc} {existing}": "exists; overwrite it with force=True (--force)",
        f"/save {doc} ../../outside.kvc": "leaves the exports directory",
        f"/save {view} view.kvc": "a view has no KV of its own",
        f"/restore {corrupt}": "not a KV file",
        f"/restore {tmp_path / 'missing.kvc'}": "does not exist",
        "/mode fast": "'fast' is not one of 'exact', 'reuse', 'realign'",
        "/mode exact 0.2": "applies to realign only",
        "/mode realign 1.5": "recompute must be from 0 to 1",
        "/auto maybe": "is not one of 'on', 'off'",
        f"/split {doc} 0": "split point must be between 1 and",
        f"/split {doc} 99999": "split point must be between 1 and",
        f"/split {doc} half": "'half' is not a valid integer",
        f"/delete {doc}": "is used by view(s)",
        # all or none: the first answer is not deleted when the second one cannot be
        f"/output delete {chat.hashes['partial']} {chat.hashes['answer']}": "is used by view(s)",
        f"/output delete {chat.hashes['answer']} {doc}": "is a document, not an answer",
        f"/output tag kept {doc}": "is a document, not an answer: /tag acts on any chunk",
        f"/output activate {chat.hashes['prompt']}": "is a prompt, not an answer",
        f"/tag {doc} 'two words'": "invalid tag",
        f"/compose {doc}": "compose needs at least two chunks",
        f"/move {doc} tape": "'tape' is not one of 'gpu', 'cpu', 'disk'",
        "/nope": "unknown command /nope",
        '/load "unclosed': "No closing quotation",
    }
    for line, message in cases.items():
        assert message in chat.error(line), line

    # Two chunks whose hashes share a prefix: the prefix is ambiguous, both are named.
    client = connect(chat.home)
    registry = ChunkRegistry(client)
    twin = doc[:4] + ("0" if doc[4] != "0" else "1") * 60
    registry.put(ChunkInfo(hash=twin, content_hash=content_hash([1]), token_ids=[1]))
    try:
        out = chat.error(f"/info {doc[:4]}")
        assert "is ambiguous" in out and doc in out and twin[:12] in out
    finally:
        registry.delete(twin)
        close(client)
    assert chat.state() == before


def test_tab_completion_and_history(chat):
    doc = chat.hashes["doc"]
    chat.child.send("/inf\t")  # the command, and a space after it (drawn as a cursor move)
    chat.child.expect_exact("/info")
    chat.child.send(f"{doc[:5]}\t")  # then the hash, typed straight after
    chat.child.expect_exact(doc)
    chat.child.send("\r")
    chat.child.expect_exact(PASTE_OFF)
    chat.child.expect_exact(PASTE_ON)
    out = clean(chat.child.before)
    chat.child.expect_exact(PROMPT)
    assert re.search(rf"hash +{doc}[0-9a-f]{{52}}", out)
    chat.child.send("/load vau\t")  # a file name, in the chat's working directory
    chat.child.expect_exact("vault.txt")
    chat.child.send("\x15")  # Ctrl-U: clear the line
    chat.child.send("/mod\t")
    chat.child.expect_exact("/mode")
    assert chat.run("").startswith("mode: realign (recompute 0.15)")
    history = (chat.home / "chat_history").read_text()
    assert f"/load {chat.files / 'vault.txt'} --tag vault" in history


def test_quit_leaves_and_a_fresh_process_sees_the_chunks(chat):
    chat.child.sendintr()  # Ctrl-C at the prompt only clears the line
    chat.child.expect_exact(PROMPT)
    chat.child.send("/quit\r")
    chat.child.expect(pexpect.EOF)
    chat.child.close()
    assert chat.child.exitstatus == 0
    done = subprocess.run(
        [KVCHUNKS, "list", "--json"], env=chat.env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    chunks = {c["hash"][:12]: c for c in json.loads(done.stdout)}
    doc = chunks[chat.hashes["doc"]]
    assert doc["tags"] == ["vault", "facts"] and doc["kind"] == "input"
    assert doc["is_active"] and chunks[chat.hashes["answer"]]["is_active"]
    assert chunks[chat.hashes["partial"]]["metadata"]["interrupted"] is True
    assert chunks[chat.hashes["view"]]["kind"] == "composed"
    assert chunks[chat.hashes["answer"]]["parent_chunks"][-1][:12] == chat.hashes["prompt"]
