"""The chat's /output command: the answers its generations made, listed, activated, deleted
or tagged, the last one by default. A chat-only command: a one-shot run has no last answer.
"""

from __future__ import annotations

import click

from kvchunks.cli import render
from kvchunks.cli.shared import active_hashes, json_option, show, show_switched
from kvchunks.cli.state import State, pass_state
from kvchunks.common import ChunkNotFound, InvalidInput


@click.group()
def output() -> None:
    """The answers of generations: list, activate, delete or tag them."""


@output.command("list")
@json_option
@pass_state
def output_list(state: State, as_json: bool) -> None:
    """List the answers generated in this context, oldest first."""
    cm = state.manager
    chunks = [
        c
        for c in cm.list_chunks()
        if c.kind == "output" and c.metadata.get("context") == cm.context_name
    ]
    title = f"outputs of context '{cm.context_name}'"
    show(state, as_json, [c.to_json() for c in chunks], lambda: render.chunks_table(chunks, title))


@output.command("activate")
@click.argument("refs", nargs=-1, metavar="[HASH...]")
@json_option
@pass_state
def output_activate(state: State, refs: tuple[str, ...], as_json: bool) -> None:
    """Activate answers; without HASH, the last prompt and its answer, so the conversation
    goes on from them."""
    cm = state.manager
    chosen = _answers(state, refs, "activate") or _last_turn(state, with_prompt=True)
    before = active_hashes(cm)
    show_switched(state, as_json, True, cm.activate_chunks(chosen), before)


@output.command("delete")
@click.argument("refs", nargs=-1, metavar="[HASH...]")
@click.option("--cascade", is_flag=True, help="Also delete the views that read them.")
@json_option
@pass_state
def output_delete(state: State, refs: tuple[str, ...], cascade: bool, as_json: bool) -> None:
    """Delete answers; without HASH, the last answer."""
    cm = state.manager
    deleted = cm.delete_chunks(_answers(state, refs, "delete") or _last_turn(state), cascade)
    line = f"deleted {', '.join(render.short(h) for h in deleted)}"
    show(state, as_json, {"deleted": deleted}, line)  # as `delete --json`


@output.command("tag")
@click.argument("tag")
@click.argument("refs", nargs=-1, metavar="[HASH...]")
@json_option
@pass_state
def output_tag(state: State, tag: str, refs: tuple[str, ...], as_json: bool) -> None:
    """Tag answers with TAG; without HASH, the last answer."""
    cm = state.manager
    hashes = _answers(state, refs, "tag") or _last_turn(state)
    chunks = [cm.tag_chunk(chunk_hash, tag) for chunk_hash in hashes]
    lines = [f"tagged {render.short(c.hash)}; tags: {', '.join(c.tags)}" for c in chunks]
    show(state, as_json, [c.to_json() for c in chunks], lines)


def _answers(state: State, refs: tuple[str, ...], command: str) -> list[str]:
    """The hashes of the answers HASH... name; refused in one line, before anything is
    done, if one of them is another kind of chunk (the top-level commands act on any)."""
    chunks = [state.manager.get_chunk(ref) for ref in refs]
    for chunk in chunks:
        if chunk.type != "answer":
            kind = f"{chunk.type} view" if chunk.layout == "view" else chunk.type
            raise InvalidInput(
                f"{render.short(chunk.hash)} is a {kind}, not an answer: /{command} acts on "
                "any chunk"
            )
    return [c.hash for c in chunks]


def _last_turn(state: State, with_prompt: bool = False) -> list[str]:
    """The last generation's answer chunks (after its prompt, with_prompt); refused in one
    line when there is none, or when one of them has been deleted since."""
    cm = state.manager
    last = cm.last_generation
    if last is None:
        raise InvalidInput("no answer generated in this chat yet; give a HASH (see /output list)")
    if not last.output_chunks:
        raise InvalidInput("the last generation kept no answer; give a HASH (see /output list)")
    turn = [last.prompt_chunk] if with_prompt else []
    hashes = [c.hash for c in [*turn, *last.output_chunks]]
    try:
        for chunk_hash in hashes:
            cm.get_chunk(chunk_hash)
    except ChunkNotFound:
        raise InvalidInput(
            "the last answer (or its prompt) was deleted; give a HASH (see /output list)"
        ) from None
    return hashes
