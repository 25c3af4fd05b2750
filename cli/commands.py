"""The chunk operations, each one click command: a `kvchunks` subcommand and, unchanged, the
chat's slash command of the same name (`/save` and `/restore` are `export` and `import`).
The context's own commands are in context_commands.py.

Commands that need only the registry (list, info, activate, deactivate, tag) work on
`state.catalog`, so a one-shot run never loads the model or imports torch. The others look
their chunks up there too before the model loads, so that a mistyped HASH is refused at once.

Every command checks what it can before it changes anything, so a bad input leaves the chunk
pool and the context as they were.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kvchunks.cli import render
from kvchunks.cli.shared import (
    active_hashes,
    check_refs,
    hash_argument,
    json_option,
    show,
    show_switched,
)
from kvchunks.cli.state import State, pass_state
from kvchunks.cli.tree import split_timelines
from kvchunks.common import (
    ContextWindowExceeded,
    KVChunksError,
    export_target,
    import_source,
    read_text_file,
)
from kvchunks.vocabulary import ROLES, TIERS

if TYPE_CHECKING:
    from kvchunks import Catalog, ChunkInfo

# -- chunks -----------------------------------------------------------------------------------


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tag", "tags", multiple=True, help="Tag the new chunk(s); repeatable.")
@click.option("--activate", is_flag=True, help="Activate the new chunk(s) in the context.")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="system",
    show_default=True,
    help="Chat-template role the text is framed as.",
)
@click.option(
    "--split",
    "split_tokens",
    type=click.IntRange(min=1),
    metavar="N",
    help="Cut the text into chunks of at most N tokens, at paragraph ends, else sentence "
    "ends (for a file longer than the context window).",
)
@json_option
@pass_state
def load(
    state: State,
    files: tuple[Path, ...],
    tags: tuple[str, ...],
    activate: bool,
    role: str,
    split_tokens: int | None,
    as_json: bool,
) -> None:
    """Load UTF-8 text FILES as chunks, in order; their KV is computed now.

    Every file is read and checked before any is loaded. A file that cannot be loaded even
    so (longer than the context window, no room left) stops the load there: the files
    before it stay loaded, and the error names their chunks."""
    # The chat and a quoted shell argument leave ~ as it is.
    paths = list(dict.fromkeys(file.expanduser() for file in files))
    for path in paths:  # a missing, empty or binary file is refused before the model loads
        read_text_file(path)
    started = time.time()  # a chunk made before this was stored already: nothing computed
    loaded: list[tuple[ChunkInfo, Path]] = []
    try:
        for path in paths:
            made = _load_file(state, path, tags, role, split_tokens)
            loaded += [(chunk, path) for chunk in made]
    except KVChunksError as e:
        if not loaded:
            raise
        kept = ", ".join(render.describe(chunk) for chunk, _ in loaded)
        raise KVChunksError(f"{e}; loaded before it: {kept}") from e
    chunks = [chunk for chunk, _ in loaded]
    if activate:
        chunks = _activate_loaded(state.manager, chunks)
    stored = [c.created_at < started for c in chunks]
    lines = [
        f"loaded {render.describe(c)}{', active' if c.is_active else ''} from {path}"
        + (" (already stored: nothing computed)" if old else "")
        for c, (_, path), old in zip(chunks, loaded, stored, strict=True)
    ]
    if hidden := list(dict.fromkeys(render.short(c.hash) for c in chunks if not c.is_active)):
        # The next question would not read them: the load alone does not say so.
        them = "it" if len(hidden) == 1 else "them"
        lines.append(f"not active: activate {' '.join(hidden)} for the model to see {them}")
    documents = [
        {**c.to_json(), "already_stored": old} for c, old in zip(chunks, stored, strict=True)
    ]
    show(state, as_json, documents, lines)


def _load_file(
    state: State, path: Path, tags: tuple[str, ...], role: str, split_tokens: int | None
) -> list[ChunkInfo]:
    from kvchunks.cli.progress import load_progress  # rich's progress: only loads need it

    with load_progress(state, path) as on_progress:
        made = state.manager.load_file(  # absolute: a cluster's worker reads it elsewhere
            path.absolute(),
            role=role,
            tags=list(tags),
            split_tokens=split_tokens,
            on_progress=on_progress,
        )
    return made if isinstance(made, list) else [made]


def _activate_loaded(cm: Catalog, chunks: list[ChunkInfo]) -> list[ChunkInfo]:
    """Activate what `load` made. The chunks' sizes are known only once they are computed,
    so a window too full for them is found after: the error says they are kept."""
    try:
        return cm.activate_chunks([c.hash for c in chunks])
    except ContextWindowExceeded as e:
        kept = ", ".join(render.describe(c) for c in chunks)
        raise ContextWindowExceeded(f"{e}; loaded all the same, not active: {kept}") from e


@click.command("list")
@click.argument("pattern", required=False)
@click.option("--tag", help="Only chunks with this tag.")
@json_option
@pass_state
def list_chunks(state: State, pattern: str | None, tag: str | None, as_json: bool) -> None:
    """List chunks, oldest first.

    PATTERN is a glob matched against the hash, the text, the source file and the tags,
    ignoring case; without * ? [ it matches the start of the hash, or anywhere in the others.
    """
    chunks = state.catalog.list_chunks(pattern, tag)
    show(state, as_json, [c.to_json() for c in chunks], lambda: render.chunks_table(chunks))


@click.command()
@hash_argument
@json_option
@pass_state
def info(state: State, ref: str, as_json: bool) -> None:
    """Show everything about one chunk: provenance, tier, tags, metadata, blocks.

    Of the chunks computed after it, "continued by" are those of its own timeline (its
    subtree in `kvchunks tree`); the others were computed where another chunk came last.
    "Same text" are the chunks with its tokens computed after other chunks than it was.
    """
    cm = state.catalog
    chunk = cm.get_chunk(ref)
    parents, children = cm.provenance(chunk.hash)
    continued, elsewhere = split_timelines(cm, chunk.hash, children)
    same_text = cm.same_text(chunk.hash)
    document = {
        **chunk.to_json(tokens=True),
        "parents": [p.hash for p in parents],
        "children": [c.hash for c in children],  # every chunk computed after it
        "continued_by": [c.hash for c in continued],
        "later_in_other_timelines": [c.hash for c in elsewhere],
        "same_text": [c.hash for c in same_text],
    }
    show(
        state,
        as_json,
        document,
        lambda: render.info_table(chunk, parents, continued, elsewhere, same_text),
    )


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="HASH...")
@json_option
@pass_state
def activate(state: State, refs: tuple[str, ...], as_json: bool) -> None:
    """Let the model see these chunks, after the ones already active (all or none)."""
    before = active_hashes(state.catalog)
    show_switched(state, as_json, True, state.catalog.activate_chunks(list(refs)), before)


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="HASH...")
@json_option
@pass_state
def deactivate(state: State, refs: tuple[str, ...], as_json: bool) -> None:
    """Hide these chunks from the model (they stay stored)."""
    before = active_hashes(state.catalog)
    show_switched(state, as_json, False, state.catalog.deactivate_chunks(list(refs)), before)


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="HASH HASH...")
@click.option("--tag", "tags", multiple=True, help="Tag the new chunk; repeatable.")
@json_option
@pass_state
def compose(state: State, refs: tuple[str, ...], tags: tuple[str, ...], as_json: bool) -> None:
    """Make one chunk that reads these chunks' KV in order (a view: nothing is copied)."""
    check_refs(state, refs)
    view = state.manager.compose_chunks(list(refs), tags=list(tags))
    line = f"composed {render.describe(view)} from {len(refs)} chunks"
    show(state, as_json, view.to_json(), line)


# A negative AT is a value to refuse with the split's own message, not an unknown option.
@click.command(context_settings={"ignore_unknown_options": True})
@hash_argument
@click.argument("at", type=int)
@json_option
@pass_state
def split(state: State, ref: str, at: int, as_json: bool) -> None:
    """Make two chunks of one, cut before token AT (views: nothing is copied)."""
    check_refs(state, [ref])
    head, tail = state.manager.split_chunk(ref, at)
    line = f"split into {render.describe(head)} and {render.describe(tail)}"
    show(state, as_json, [head.to_json(), tail.to_json()], line)


@click.command()
@hash_argument
@click.argument("tag")
@click.option("--remove", is_flag=True, help="Take the tag off instead.")
@json_option
@pass_state
def tag(state: State, ref: str, tag: str, remove: bool, as_json: bool) -> None:
    """Tag a chunk (or untag it with --remove)."""
    cm = state.catalog
    had = tag in cm.get_chunk(ref).tags
    chunk = cm.untag_chunk(ref, tag) if remove else cm.tag_chunk(ref, tag)
    tags = ", ".join(chunk.tags) or "none"
    short = render.short(chunk.hash)
    if had != remove:  # nothing to do: say so, rather than that it was done
        line = f"{short} {'already had' if had else 'had no'} tag {tag!r}; tags: {tags}"
    else:
        line = f"{'untagged' if remove else 'tagged'} {short}; tags: {tags}"
    show(state, as_json, chunk.to_json(), line)


@click.command()
@hash_argument
@click.option("--cascade", is_flag=True, help="Also delete the views that read this chunk.")
@json_option
@pass_state
def delete(state: State, ref: str, cascade: bool, as_json: bool) -> None:
    """Delete a chunk and its KV for good."""
    check_refs(state, [ref])
    deleted = state.manager.delete_chunk(ref, cascade=cascade)
    line = f"deleted {', '.join(render.short(h) for h in deleted)}"
    show(state, as_json, {"deleted": deleted}, line)  # DELETE /v1/chunks/{ref}'s body


@click.command()
@hash_argument
@json_option
@pass_state
def populate(state: State, ref: str, as_json: bool) -> None:
    """Bring a chunk's KV into the pool now (from its file, or recomputed)."""
    check_refs(state, [ref])
    chunk = state.manager.populate(ref)
    line = f"populated {render.describe(chunk)} on {chunk.tier}"
    show(state, as_json, chunk.to_json(), line)


# -- tiers ------------------------------------------------------------------------------------


@click.command()
# Not required by click: it would take `move 3fa2` for a tier without hashes and say the
# hashes are missing. The tier is checked first, then the hashes (before the model loads).
@click.argument("refs", nargs=-1, metavar="HASH...")
@click.argument("tier", type=click.Choice(TIERS), metavar="TIER")
@json_option
@pass_state
def move(state: State, refs: tuple[str, ...], tier: str, as_json: bool) -> None:
    """Move chunks' KV to TIER: gpu (the pool), cpu (host memory) or disk.

    Several chunks move one after another; in a terminal a bar shows the bytes moved. A
    view's KV is that of the chunks it reads: they move."""
    from kvchunks.cli.progress import move_progress  # rich's progress: only moves need it

    if not refs:
        raise click.MissingParameter(param_type="argument", param_hint="'HASH...'")
    check_refs(state, refs)
    with move_progress(state, len(refs)) as on_progress:
        chunks = state.manager.move_chunks(list(refs), tier, on_progress=on_progress)
    lines = [f"moved {render.short(c.hash)}{_kv_of(c)} to {c.tier}" for c in chunks]
    show(state, as_json, [c.to_json() for c in chunks], lines)


def _kv_of(chunk: ChunkInfo) -> str:
    """For a view, the chunks whose KV moved with it."""
    if chunk.layout != "view":
        return ""
    sources = dict.fromkeys(render.short(s.hash) for s in chunk.sources)
    return f" (a view: the KV of {', '.join(sources)})"


@click.command()
@hash_argument
@json_option
@pass_state
def prefetch(state: State, ref: str, as_json: bool) -> None:
    """Start bringing a chunk's KV towards the gpu pool in the background."""
    check_refs(state, [ref])
    chunk = state.manager.prefetch(ref)  # its tier as the prefetch starts
    show(state, as_json, chunk.to_json(), f"prefetching {render.short(chunk.hash)}")


# -- files ------------------------------------------------------------------------------------


@click.command("export")
@hash_argument
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@json_option
@pass_state
def export(state: State, ref: str, file: Path, force: bool, as_json: bool) -> None:
    """Write a chunk (tokens, record, KV) to FILE for another data directory to import.

    A relative FILE goes under <data dir>/exports and may not leave it.
    """
    check_refs(state, [ref])
    if not state.address:  # with one, the path is the worker's, checked there
        export_target(state.data_dir, file, force)
    cm = state.manager
    target = cm.export_chunk(ref, file, force=force)
    chunk = cm.get_chunk(ref)
    line = f"saved {render.short(chunk.hash)} to {target}"
    show(state, as_json, {**chunk.to_json(), "path": str(target)}, line)


@click.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@pass_state
def import_(state: State, file: Path, as_json: bool) -> None:
    """Add the chunk in FILE (written by export, same model); relative paths are also looked
    up in <data dir>/exports."""
    if not state.address:  # with one, the path is the worker's, checked there
        import_source(state.data_dir, file)
    chunk = state.manager.import_chunk(file)
    line = f"restored {render.describe(chunk)} from {file}"
    show(state, as_json, chunk.to_json(), line)


SUBCOMMANDS = [
    load,
    list_chunks,
    info,
    activate,
    deactivate,
    compose,
    split,
    tag,
    delete,
    populate,
    move,
    prefetch,
    export,
    import_,
]
