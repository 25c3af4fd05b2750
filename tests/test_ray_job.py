"""`ray job submit` of kvchunks.cli.job against the session's cluster and service."""

from __future__ import annotations

import json
import subprocess

import ray_fixtures

from kvchunks.actors.remote import get
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
