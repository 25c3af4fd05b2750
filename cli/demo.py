"""`kvchunks demo`: the main job end to end on the default model.

Prepares the model, loads a document as a chunk, activates it, asks a question only the
document can answer, and shows the chunks with their provenance.
"""

from __future__ import annotations

import click
from rich.text import Text

from kvchunks.cli.render import chunks_table, short, type_label
from kvchunks.cli.state import State, pass_state

DOCUMENT = """\
Harbor Notes, internal memo 14.
The night ferry from Lindqvist Pier to the island of Vesk now leaves at 23:40.
The ferry is called the Grey Heron, and its captain is Marta Oyelaran.
Tickets for the night ferry cost 12 crowns and are sold only at kiosk 7.
"""
LABEL_WIDTH = 9  # "question" and a space: the lines' texts start in one column
QUESTION = "What is the name of the night ferry, and who is its captain?"


@click.command()
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=48,
    show_default=True,
    help="Longest answer, in tokens.",
)
@pass_state
def demo(state: State, max_tokens: int) -> None:
    """Load a document, activate it alone (what else was active in the context is deactivated,
    and named), ask about it, and show the chunks."""
    from kvchunks import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)  # checked before any change
    state.check_mode()
    path = state.data_dir / "demo" / "harbor-notes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOCUMENT)
    cm = state.manager
    out = state.out
    # The question reads the document alone: what else is active makes way, and is named.
    others = [c.hash for c in cm.context().chunks]
    cm.clear()
    if others:
        put_back = f"kvchunks {_context_option(state)}activate {' '.join(map(short, others))}"
        out.print(f"deactivated {len(others)} chunk(s) of context '{state.context}': {put_back}")
    doc = cm.load_file(path, tags=["demo"])
    cm.activate_chunk(doc.hash)
    out.print(labelled("document", f"{short(doc.hash)}  {doc.token_count} tokens, activated"))
    out.print(labelled("question", QUESTION))
    with out.status("generating"):
        result = cm.generate(QUESTION, params, mode=state.mode, recompute=state.recompute)
    out.print(labelled("answer", result.text.strip()))
    out.print(
        f"          first token {result.ttft_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s"
    )
    made = [doc, result.prompt_chunk, *result.output_chunks]
    out.print(chunks_table([cm.get_chunk(c.hash) for c in made], "chunks of this run"))
    for c in made[1:]:
        parents = " + ".join(short(p) for p in c.parent_chunks)
        out.print(f"  {short(c.hash)} ({type_label(c)}) was computed after {parents}")
    chat = f"kvchunks {_context_option(state)}chat"
    out.print(f"Continue with: {chat}   (the document stays active in context '{state.context}')")


def labelled(label: str, text: str) -> Text:
    """A bold label, then `text` as it is: the model's answer may contain [brackets], which
    rich would otherwise read as markup."""
    return Text.assemble((label, "bold"), " " * (LABEL_WIDTH - len(label)), text)


def _context_option(state: State) -> str:
    return "" if state.context == "default" else f"--context {state.context} "
