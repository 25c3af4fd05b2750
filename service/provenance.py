"""The provenance tree: every chunk under the chunk it was computed right after.

A chunk's `parent_chunks` are all the chunks it was computed after, in order, so the
registry's children of a document are every chunk computed after it in any context. The tree
keeps one edge per chunk, to its immediate predecessor (the last of those parents): a
conversation reads as a path, and its branches (two follow-ups of one answer, two answers to
one prompt) as siblings.

Pure: chunk records in, nested nodes out, nothing read from the registry or the model, so the
command line and the web page draw the same tree from what `list_chunks` returns.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvchunks.common import ChunkNotFound

if TYPE_CHECKING:
    from kvchunks.store.chunk import ChunkInfo


@dataclass
class TreeNode:
    chunk: ChunkInfo
    follows: str | None = None  # the hash of the chunk it hangs under; None for a root
    children: list[TreeNode] = field(default_factory=list)  # oldest first

    def walk(self) -> Iterator[TreeNode]:
        """This node, then its descendants depth first, oldest branch first."""
        return walk([self])


@dataclass
class ProvenanceTree:
    """A forest of chunks; for one chunk's subtree, also the chunks that lead to it."""

    roots: list[TreeNode]
    ancestors: list[TreeNode] = field(default_factory=list)  # root first, parent last

    def nodes(self) -> Iterator[TreeNode]:
        return walk(self.roots)

    def to_json(self) -> dict[str, Any]:
        """The tree as flat lists of hashes and nodes (each node's `children` and `follows` are
        hashes): nesting a long conversation would go past the JSON encoder's depth limit, and
        graph-drawing libraries take nodes and edges anyway."""
        return {
            "ancestors": [n.chunk.hash for n in self.ancestors],
            "roots": [n.chunk.hash for n in self.roots],
            "nodes": [
                {
                    **n.chunk.to_json(),
                    "follows": n.follows,
                    "children": [c.chunk.hash for c in n.children],
                }
                for n in self.nodes()
            ],
        }


def provenance_tree(chunks: Iterable[ChunkInfo], chunk_hash: str | None = None) -> ProvenanceTree:
    """The forest of `chunks` (listed oldest first, as the registry lists them), or with
    `chunk_hash` that chunk's subtree and its path from its root."""
    nodes = {c.hash: TreeNode(c) for c in chunks}
    roots = []
    for node in nodes.values():
        node.follows = predecessor(node.chunk, nodes)
        (nodes[node.follows].children if node.follows else roots).append(node)
    if chunk_hash is None:
        return ProvenanceTree(roots)
    if chunk_hash not in nodes:
        raise ChunkNotFound(f"no chunk {chunk_hash[:12]} among the chunks listed")
    ancestors: list[TreeNode] = []
    follows = nodes[chunk_hash].follows
    while follows is not None and len(ancestors) < len(nodes):  # bounded: see predecessor()
        ancestors.append(nodes[follows])
        follows = nodes[follows].follows
    return ProvenanceTree([nodes[chunk_hash]], ancestors[::-1])


def predecessor(chunk: ChunkInfo, present: Collection[str]) -> str | None:
    """The chunk `chunk` was computed right after: the last of its parents still stored, so
    the continuation of a deleted turn hangs under the turn before it rather than apart.

    No chunk can be its own ancestor (a hash covers its parents' hashes); should forged
    records claim so, their nodes are reached from no root and not drawn, and the path up
    from one of them stops after as many steps as there are chunks."""
    return next((h for h in reversed(chunk.parent_chunks) if h in present), None)


def walk(roots: list[TreeNode]) -> Iterator[TreeNode]:
    """The nodes depth first, oldest branch first. A loop, not recursion: a chain of turns
    continued one context after another can be deeper than Python's recursion limit."""
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))
