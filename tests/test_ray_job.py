"""`ray job submit` of kvchunks.cli.job against the session's cluster and service."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray_fixtures
from click.testing import CliRunner

from kvchunks.actors.remote import get
from kvchunks.cli import job
from kvchunks.common import ContextWindowExceeded
from kvchunks.engine import SamplingParams

ray_cluster, ray_service = ray_fixtures.ray_cluster, ray_fixtures.ray_service  # used by name

DOCS = {
    "mill.txt": "The secret code of the vault is 4817. The vault is under the old mill in Zurich.",
    "cats.txt": "Marie keeps three cats named Io, Europa and Callisto.",
}
QUESTIONS = ["Where is the vault?", "What are the names of Marie's cats?"]


def in_process_answers(make_cm, work, max_tokens: int) -> list[dict]:
    """What the job must write: the same steps on a ContextManager of a fresh data directory
    (documents in name order, all active, each question greedy in realign mode)."""
    cm = make_cm("job")
    docs = [cm.add_chunk((work / "docs" / name).read_text()) for name in sorted(DOCS)]
    for doc in docs:
        cm.activate_chunk(doc.hash)
    rows = []
    for question in QUESTIONS:
        g = cm.generate(question, SamplingParams(temperature=0, max_tokens=max_tokens), "realign")
        rows.append(
            {
                "question": question,
                "answer": g.text,
                "chunks": [d.hash for d in docs],
                "prompt_chunk": g.prompt_chunk.hash,
                "output_chunk": g.output_chunk.hash,
                "mode": g.mode,
                "tokens_reused": g.tokens_reused,
                "tokens_recomputed": g.tokens_recomputed,
            }
        )
    return rows


def test_ray_job_submit_answers_questions_with_the_documents(
    ray_cluster, ray_service, make_cm, tmp_path
):
    work = tmp_path / "job"
    (work / "docs").mkdir(parents=True)
    for name, text in DOCS.items():
        (work / "docs" / name).write_text(text)
    (work / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    out = tmp_path / "answers.jsonl"
    command = [
        *(str(ray_fixtures.BIN / "ray"), "job", "submit"),
        *("--address", ray_cluster.dashboard, "--working-dir", str(work), "--"),
        *("python", "-m", "kvchunks.cli.job", "--docs", "docs", "--questions", "questions.txt"),
        *("--out", str(out), "--max-tokens", "16"),
    ]
    done = subprocess.run(command, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "answered 2 question(s)" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == QUESTIONS
    assert rows == in_process_answers(make_cm, work, max_tokens=16)
    registry = ray_service.service.registry
    docs = [get(registry.call.remote("get", h)) for h in rows[0]["chunks"]]
    assert sorted(d.metadata["source"] for d in docs) == sorted(DOCS)  # cats.txt, mill.txt
    for row in rows:
        assert row["chunks"] == rows[0]["chunks"]
        output = get(registry.call.remote("get", row["output_chunk"]))
        assert output.parent_chunks == [*row["chunks"], row["prompt_chunk"]]


class StoringClient:
    """Stands in for the Ray client: computes documents of a given size and records every
    call that changes the context."""

    def __init__(self, tokens_per_document: int):
        self.tokens = tokens_per_document
        self.changes: list[str] = []

    def add_chunk(self, text: str, **_) -> SimpleNamespace:
        return SimpleNamespace(hash=f"{len(text):064x}", token_count=self.tokens)

    def context(self) -> SimpleNamespace:
        return SimpleNamespace(window=8192)

    def activate_chunks(self, refs: list[str]) -> None:
        self.changes.append("activate_chunks")
        self.activated = list(refs)

    def generate(self, question: str, *_, **__) -> SimpleNamespace:
        self.changes.append("generate")
        made = SimpleNamespace(hash="f" * 64)
        return SimpleNamespace(
            text="An answer.",
            prompt_chunk=made,
            output_chunk=made,
            mode="realign",
            tokens_reused=0,
            tokens_recomputed=0,
        )

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.changes.append(name)


def job_files(at: Path, docs: dict[str, bytes], questions: bytes) -> list[str]:
    (at / "docs").mkdir()
    for name, data in docs.items():
        (at / "docs" / name).write_bytes(data)
    (at / "questions.txt").write_bytes(questions)
    return ["--docs", str(at / "docs"), "--questions", str(at / "questions.txt")]


GOOD = {"a.txt": b"The ferry leaves at nine.", "c.txt": b"Tea is at five."}


@pytest.mark.parametrize(
    ("docs", "questions", "out", "message"),
    [
        ({**GOOD, "b.bin": b"\x00\x01 binary"}, b"Why?", "answers.jsonl", "looks binary"),
        (GOOD, b" \n\n", "answers.jsonl", "questions.txt is empty"),
        ({}, b"Why?", "answers.jsonl", "has no documents"),
        (GOOD, b"Why?", "missing/answers.jsonl", "no folder"),
    ],
    ids=["bad-document", "no-questions", "no-documents", "no-out-folder"],
)
def test_job_checks_every_input_before_it_connects(
    tmp_path, monkeypatch, docs, questions, out, message
):
    def connect(*_):
        raise AssertionError("connected before the inputs were checked")

    monkeypatch.setattr("kvchunks.actors.client.connect", connect)
    args = [*job_files(tmp_path, docs, questions), "--out", str(tmp_path / out)]
    done = CliRunner().invoke(job.main, args)
    assert done.exit_code == 1, done.output
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / out).exists()


def test_job_refuses_documents_over_the_window_before_the_context_changes(tmp_path, monkeypatch):
    client = StoringClient(tokens_per_document=5000)  # two of them: over 8192
    monkeypatch.setattr("kvchunks.actors.client.connect", lambda *_: client)
    out = tmp_path / "answers.jsonl"
    done = CliRunner().invoke(job.main, [*job_files(tmp_path, GOOD, b"Why?"), "--out", str(out)])
    assert done.exit_code == 1, done.output
    assert "the documents have 10000 tokens, over the context window of 8192" in done.stderr
    assert client.changes == [] and not out.exists()


def test_a_failed_run_leaves_the_last_answers_file_as_it_was(tmp_path, monkeypatch):
    client = StoringClient(tokens_per_document=10)
    answer = client.generate

    def generate(question: str, *args, **kwargs):
        if question != "Why?":
            raise ContextWindowExceeded("the second question does not fit")
        return answer(question, *args, **kwargs)

    monkeypatch.setattr(client, "generate", generate)
    monkeypatch.setattr("kvchunks.actors.client.connect", lambda *_: client)
    out = tmp_path / "answers.jsonl"
    out.write_text("the last run's answers\n")
    args = [*job_files(tmp_path, GOOD, b"Why?\nAnd then?"), "--out", str(out)]
    done = CliRunner().invoke(job.main, args)
    assert done.exit_code == 1 and "does not fit" in done.stderr, done.output
    assert out.read_text() == "the last run's answers\n"
    [row] = [json.loads(line) for line in job.partial_path(out).read_text().splitlines()]
    assert row["question"] == "Why?"


def test_job_checks_the_context_name_before_it_connects(tmp_path, monkeypatch):
    def connect(*_):
        raise AssertionError("connected before the inputs were checked")

    monkeypatch.setattr("kvchunks.actors.client.connect", connect)
    args = [*job_files(tmp_path, GOOD, b"Why?"), "--out", str(tmp_path / "a.jsonl")]
    done = CliRunner().invoke(job.main, [*args, "--context", "no spaces"])
    assert done.exit_code == 1 and "invalid context name" in done.stderr, done.output


def test_two_documents_of_one_text_are_one_chunk_counted_once(tmp_path, monkeypatch):
    client = StoringClient(tokens_per_document=5000)  # once fits 8192, twice would not
    monkeypatch.setattr("kvchunks.actors.client.connect", lambda *_: client)
    out = tmp_path / "answers.jsonl"
    same = {"a.txt": b"The ferry leaves at nine.", "b.txt": b"The ferry leaves at nine."}
    done = CliRunner().invoke(job.main, [*job_files(tmp_path, same, b"Why?"), "--out", str(out)])
    assert done.exit_code == 0, done.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["chunks"]) == 1 and len(client.activated) == 1
