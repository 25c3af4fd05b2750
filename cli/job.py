"""A Ray job: answer questions about documents with the running kvchunks service.

    ray start --head --include-dashboard=true --dashboard-port 8265
    kvchunks serve --workers 2
    ray job submit --address http://127.0.0.1:8265 --working-dir ./data -- \\
        python -m kvchunks.cli.job --docs docs --questions questions.txt --out /tmp/answers.jsonl

--docs and --questions are read inside the uploaded working directory; give --out as an
absolute path (it is written on the node that runs the job's driver, the head). With Ray's
token authentication on (`~/.ray/auth_token` exists), run `ray job submit` with
RAY_AUTH_MODE=token in its environment.

Every file in DOCS (sorted by name) becomes a chunk (a document loaded before is found
again, not recomputed); each line of QUESTIONS is answered with all the documents active
in the job's context, and written to OUT as one JSON line: question, answer, chunks (the
documents' hashes), prompt_chunk and output_chunk. The sampling options are those of
`kvchunks generate`, with its defaults; --dtype refuses a service that runs in another dtype.
Every input is read and checked before the job connects, and documents that cannot all be
active at once are refused before the context changes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kvchunks.cli.shared import dtype_option, sampling_options, sampling_params
from kvchunks.common import ContextWindowExceeded, InvalidInput, KVChunksError, read_text_file
from kvchunks.vocabulary import DEFAULT_MODE, MODES, check_name, check_recompute

if TYPE_CHECKING:
    from kvchunks import ChunkInfo, Client, SamplingParams


@click.command()
@click.option(
    "--docs", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--questions", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--address", default="auto", show_default=True, help="Ray cluster address.")
@click.option("--context", default="job", show_default=True, help="Context the job works in.")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=DEFAULT_MODE,
    show_default=True,
    help="How the documents' KV is combined (they were computed separately).",
)
@click.option(
    "--recompute",
    type=float,
    help="With realign: the fraction of the documents' tokens computed again in order (0-1).",
)
@sampling_options
@dtype_option
def main(
    docs: Path,
    questions: Path,
    out: Path,
    address: str,
    context: str,
    mode: str,
    recompute: float | None,
    sampling: dict,
    dtype: str | None,
) -> None:
    """Load DOCS as chunks, answer each line of QUESTIONS with them active, write OUT."""
    try:
        check_name(context)  # before anything is loaded or connected to
        check_recompute(mode, recompute)
        params = sampling_params(sampling)
        inputs = read_inputs(docs, questions, out)
        count = run(inputs, out, address, context, (mode, recompute), params, dtype)
    except KVChunksError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"answered {count} question(s): {out}")


@dataclass
class Inputs:
    documents: dict[str, str]  # file name -> text, in name order
    questions: list[str]


def read_inputs(docs: Path, questions: Path, out: Path) -> Inputs:
    """Every input read and checked, and OUT's folder found writable, before the job
    connects: a bad one is refused while the service and the context are as they were."""
    files = sorted(p for p in docs.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InvalidInput(f"{docs} has no documents")
    documents = {p.name: read_text_file(p) for p in files}
    lines = [q.strip() for q in read_text_file(questions).splitlines() if q.strip()]
    check_writable(out)
    return Inputs(documents, lines)


def check_writable(out: Path) -> None:
    folder = out.absolute().parent
    if not folder.is_dir():
        raise InvalidInput(f"no folder {folder} to write {out.name} in; create it first")
    if not os.access(folder, os.W_OK):  # OUT is replaced by a file written beside it
        raise InvalidInput(f"cannot write {out}: permission denied")


def partial_path(out: Path) -> Path:
    """Where the answers go as they come; OUT is replaced by it once every one is in."""
    return out.with_name(f"{out.name}.partial")


def run(
    inputs: Inputs,
    out: Path,
    address: str,
    context: str,
    combine: tuple[str, float | None],
    params: SamplingParams,
    dtype: str | None,
) -> int:
    """Answer the questions; `combine` is the mode and realign's recompute fraction."""
    from kvchunks.actors.client import connect

    client = connect(address, context)
    if dtype:
        check_dtype(client, dtype)
    added = [
        client.add_chunk(text, role="system", metadata={"source": name})
        for name, text in inputs.documents.items()
    ]
    chunks = list({c.hash: c for c in added}.values())  # two files of one text: one chunk
    check_fits(client, chunks)  # before the context changes
    client.configure(auto_activate=False)  # every question sees the documents only
    client.clear()
    client.activate_chunks([c.hash for c in chunks])
    # A run that fails (a question that does not fit, a worker gone) leaves the last whole
    # OUT as it was, and its answers so far beside it.
    partial = partial_path(out)
    with partial.open("w") as f:
        for question in inputs.questions:
            result = client.generate(question, params, combine[0], recompute=combine[1])
            output = result.output_chunk.hash if result.output_chunk else None
            record = {
                "question": question,
                "answer": result.text,
                "chunks": [c.hash for c in chunks],
                "prompt_chunk": result.prompt_chunk.hash,
                "output_chunk": output,
                "mode": result.mode,
                "tokens_reused": result.tokens_reused,
                "tokens_recomputed": result.tokens_recomputed,
            }
            f.write(json.dumps(record) + "\n")
            f.flush()
    partial.replace(out)
    return len(inputs.questions)


def check_fits(client: Client, chunks: list[ChunkInfo]) -> None:
    """Refuse documents that cannot all be active at once (their sizes are known once they
    are computed; they stay stored)."""
    total, window = sum(c.token_count for c in chunks), client.context().window
    if total > window:
        raise ContextWindowExceeded(
            f"the documents have {total} tokens, over the context window of {window}; "
            "give fewer or shorter documents"
        )


def check_dtype(client: Client, dtype: str) -> None:
    """Refuse a service that computes in another dtype than the job asks for."""
    running = client.stats()["dtype"]
    if running != dtype:
        raise InvalidInput(
            f"the service runs in {running}, not {dtype}: start it with `kvchunks serve "
            f"--dtype {dtype}`, or leave --dtype out"
        )


if __name__ == "__main__":
    main()
