"""`kvchunks tree` (and `/tree` in the chat): the provenance tree as an indented tree of
chunks, as Graphviz DOT, or as JSON. The tree itself is built by the package's API
(`provenance_tree`, from the listed chunks), so the web page draws the same one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.text import Text
from rich.tree import Tree

from kvchunks import provenance_tree
from kvchunks.cli import render
from kvchunks.cli.shared import json_option, show
from kvchunks.cli.state import State, pass_state

if TYPE_CHECKING:
    from kvchunks import Catalog, ChunkInfo, ProvenanceTree, TreeNode

ACTIVE, INACTIVE = "●", "○"
PREVIEW = 48  # characters of a chunk's text on its line of the tree
PATH_SHOWN = 3  # ancestors named on the subtree's first line, nearest last
STYLES = {"document": "cyan", "prompt": "yellow", "answer": "green"}  # views: default
# Graphviz look per node type: shape and fill colour.
DOT_LOOK = {
    "document": ("note", "#cfe2ff"),
    "prompt": ("ellipse", "#fff3cd"),
    "answer": ("box", "#d1e7dd"),
    "composed": ("hexagon", "#e2e3e5"),
    "split": ("hexagon", "#e2e3e5"),
}


@click.command()
@click.argument("ref", required=False, metavar="[HASH]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "dot"]),
    default="text",
    show_default=True,
    help="text: an indented tree; dot: Graphviz DOT (draw it with `dot -Tsvg`).",
)
@json_option
@pass_state
def tree(state: State, ref: str | None, fmt: str, as_json: bool) -> None:
    """Show how chunks were computed from each other: each chunk under the one it was
    computed right after.

    Documents are roots, a prompt hangs under what it followed and an answer under its
    prompt, so each branch of a conversation is a branch of the tree. ● marks the chunks
    active in the context. With HASH, that chunk's subtree and the chunks that lead to it.
    """
    if as_json and fmt == "dot":
        context = click.get_current_context()
        raise click.UsageError("--json and --format dot exclude each other", context)
    cm = state.catalog
    built = build(cm, cm.get_chunk(ref).hash if ref else None)
    if fmt == "dot":
        click.echo(to_dot(built), nl=False)
    else:
        show(state, as_json, built.to_json(), lambda: to_rich(built, cm.context_name))


def build(cm: Catalog, chunk_hash: str | None = None) -> ProvenanceTree:
    return provenance_tree(cm.list_chunks(), chunk_hash)


def split_timelines(
    cm: Catalog, chunk_hash: str, children: list[ChunkInfo]
) -> tuple[list[ChunkInfo], list[ChunkInfo]]:
    """The chunks that continue this chunk's own timeline (its descendants in the tree), and
    the rest of its children: chunks computed after it where another chunk came last."""
    [node] = build(cm, chunk_hash).roots
    continued = [n.chunk for n in node.walk()][1:]
    own = {c.hash for c in continued}
    return continued, [c for c in children if c.hash not in own]


# -- text -------------------------------------------------------------------------------------


def to_rich(built: ProvenanceTree, context: str) -> Tree:
    if not built.roots:
        return Tree(Text("no chunks yet; `kvchunks load FILE` makes one"))
    if built.ancestors:
        head = f"after {_path(built.ancestors)}"
    else:
        head = f"{sum(1 for _ in built.nodes())} chunk(s)"
    legend = f"{ACTIVE} active in context '{context}', {INACTIVE} not"
    top = Tree(Text(f"{head}\n{legend}", no_wrap=True, overflow="ellipsis"))
    branches: dict[str | None, Tree] = {}
    for node in built.nodes():  # depth first: a node's branch exists before its children's
        under = branches.get(node.follows, top)
        branches[node.chunk.hash] = under.add(node_label(node))
    return top


def node_label(node: TreeNode) -> Text:
    """One line: the active mark, short hash, type and role, tokens, tier, text preview."""
    chunk = node.chunk
    label = Text(no_wrap=True, overflow="ellipsis", style="bold" if chunk.is_active else "")
    label.append(f"{ACTIVE if chunk.is_active else INACTIVE} {render.short(chunk.hash)} ")
    label.append(f"{chunk.type} ({chunk.role})", style=STYLES.get(chunk.type, ""))
    label.append(f" · {chunk.token_count} tokens · {chunk.tier} · ")
    label.append(render.preview(chunk.text, PREVIEW), style="dim")
    return label


def _path(ancestors: list[TreeNode]) -> str:
    """The chunks that lead to a subtree, root first; a long path keeps its two ends."""
    names = [f"{render.short(n.chunk.hash)} {n.chunk.type}" for n in ancestors]
    if len(names) > PATH_SHOWN + 1:
        names = [names[0], f"… {len(names) - PATH_SHOWN} more", *names[1 - PATH_SHOWN :]]
    return " › ".join(names)


# -- Graphviz ---------------------------------------------------------------------------------


def to_dot(built: ProvenanceTree) -> str:
    """The tree as a DOT digraph, an edge from each chunk to each chunk computed right after
    it; a subtree comes with the chunks that lead to it, dashed."""
    lines = ["digraph provenance {", '  node [fontname="Helvetica", fontsize="10"];']
    drawn = [(n, True) for n in built.ancestors] + [(n, False) for n in built.nodes()]
    for node, on_path in drawn:
        lines.append(f"  {_quote(node.chunk.hash)} [{_attributes(node, on_path)}];")
    for node, _ in drawn:
        if node.follows:  # in the drawing: a root's predecessor is an ancestor or none
            lines.append(f"  {_quote(node.follows)} -> {_quote(node.chunk.hash)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _attributes(node: TreeNode, on_path: bool) -> str:
    chunk = node.chunk
    shape, fill = DOT_LOOK[chunk.type]
    label = "\n".join(
        [
            f"{render.short(chunk.hash)} {chunk.type}",
            f"{chunk.token_count} tokens · {chunk.tier}",
            render.preview(chunk.text, 30),
        ]
    )
    looks = {
        "label": label,
        "shape": shape,
        "style": "filled,dashed" if on_path else "filled",
        "fillcolor": fill,
    }
    if chunk.is_active:
        looks |= {"color": "#d63384", "penwidth": "3", "fontname": "Helvetica-Bold"}
    return ", ".join(f"{key}={_quote(value)}" for key, value in looks.items())


def _quote(value: str) -> str:
    """A DOT quoted string whose lines are the lines of `value`: a backslash and a quote are
    escaped (Graphviz would read \\n or \\l in a chunk's text as a line break), and so is an
    ampersand (it would read &amp; as &)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
    return '"' + escaped.replace("\n", "\\n") + '"'
