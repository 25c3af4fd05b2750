"""`kvchunks tree` (text, DOT, JSON), `/tree` in the chat and the timelines of `kvchunks info`,
on a branched conversation made through the command line on the session's engine:

    doc ─ question ─ answer ┬ follow1 ┬ answer1a (4 tokens)
                            │         └ answer1b (8 tokens)
                            └ follow2 ┬ answer2a (4 tokens)
                                      └ answer2b (8 tokens)
    note ─ other ─ other_answer   (asked with doc, question, answer and note active)

and in the end doc, question, answer, follow2 and answer2b active.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys

import pytest
from click.testing import CliRunner
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from kvchunks import ChunkInfo, provenance_tree
from kvchunks.cli.chat import Chat, SlashCompleter
from kvchunks.cli.main import cli
from kvchunks.cli.state import State
from kvchunks.vocabulary import ROLES

EDGES = {
    ("doc", "question"),
    ("question", "answer"),
    ("answer", "follow1"),
    ("follow1", "answer1a"),
    ("follow1", "answer1b"),
    ("answer", "follow2"),
    ("follow2", "answer2a"),
    ("follow2", "answer2b"),
    ("note", "other"),
    ("other", "other_answer"),
}
ORDER = [  # depth first, oldest branch first
    "doc",
    "question",
    "answer",
    "follow1",
    "answer1a",
    "answer1b",
    "follow2",
    "answer2a",
    "answer2b",
    "note",
    "other",
    "other_answer",
]
FOLLOW2 = {"follow2", "answer2a", "answer2b"}
# follow2's subtree in DOT: its path from the root, then its own edges.
FOLLOW2_EDGES = {
    ("doc", "question"),
    ("question", "answer"),
    ("answer", "follow2"),
    ("follow2", "answer2a"),
    ("follow2", "answer2b"),
}
ACTIVE = {"doc", "question", "answer", "follow2", "answer2b"}
NOTE = 'Tea is served at "five" \\ sharp.'  # a quote and a backslash for DOT to escape
NODE_LINE = re.compile(r"([●○]) ([0-9a-f]{12}) ")
QUOTED = r'"(?:[^"\\]|\\.)*"'
DOT_NODE = re.compile(rf'^  "([0-9a-f]{{64}})" \[(\w+={QUOTED}(?:, \w+={QUOTED})*)\];$')
DOT_EDGE = re.compile(r'^  "([0-9a-f]{64})" -> "([0-9a-f]{64})";$')


class OpenState(State):
    """Keeps its manager open between invocations."""

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def state(tmp_path_factory, llm, model_path):
    from kvchunks.service.chunk_store import ChunkStore
    from kvchunks.service.context_manager import ContextManager

    home = tmp_path_factory.mktemp("tree_home")
    store = ChunkStore(home=home, llm=llm)
    yield OpenState(model=str(model_path), home=home, _manager=ContextManager(store=store))
    store.close()
    assert llm.block_manager.num_free == llm.block_manager.num_blocks, "pool blocks leaked"


def kvchunks(state: State, *args: str, status: int = 0, stdin: str | None = None):
    env = {"NO_COLOR": "1", "COLUMNS": "200"}
    result = CliRunner().invoke(cli, list(args), obj=state, env=env, input=stdin)
    assert result.exit_code == status, (args, result.output, result.exception)
    return result


def as_json(state: State, *args: str):
    return json.loads(kvchunks(state, *args, "--json").stdout)


def ask(state: State, prompt: str, max_tokens: int) -> tuple[str, str]:
    made = as_json(state, "generate", prompt, "--max-tokens", str(max_tokens))
    return made["prompt_chunk"]["hash"], made["output_chunk"]["hash"]


@pytest.fixture(scope="module")
def chunks(state, tmp_path_factory) -> dict[str, str]:
    """Name -> full hash of the conversation's chunks."""
    files = tmp_path_factory.mktemp("tree_files")
    (files / "vault.txt").write_text("The secret code of the vault is 4817.\n")
    (files / "note.txt").write_text(NOTE + "\n")
    named: dict[str, str] = {}
    [doc] = as_json(state, "load", str(files / "vault.txt"), "--activate")
    named["doc"] = doc["hash"]
    named["question"], named["answer"] = ask(state, "What is the secret code of the vault?", 8)
    kvchunks(state, "activate", named["question"], named["answer"])
    follow_ups = ["Describe the vault in detail.", "Write a poem about the code."]
    for n, prompt in enumerate(follow_ups, 1):
        (prompt_a, short), (prompt_b, long) = ask(state, prompt, 4), ask(state, prompt, 8)
        assert prompt_a == prompt_b  # one prompt chunk, answered twice
        assert short != long, "the 4- and 8-token answers should differ"
        named[f"follow{n}"], named[f"answer{n}a"], named[f"answer{n}b"] = prompt_a, short, long
    [note] = as_json(state, "load", str(files / "note.txt"), "--activate")
    named["note"] = note["hash"]
    named["other"], named["other_answer"] = ask(state, "When is tea served?", 8)
    kvchunks(state, "deactivate", named["note"])
    kvchunks(state, "activate", named["follow2"], named["answer2b"])
    return named


def text_nodes(text: str, names: dict[str, str]) -> list[tuple[int, str, str]]:
    """(depth, active mark, name) of each node line of a printed tree, top to bottom."""
    by_short = {h[:12]: name for name, h in names.items()}
    found = [
        (m.start() // 4, m.group(1), m.group(2))
        for m in map(NODE_LINE.search, text.splitlines())
        if m
    ]
    return [(depth, mark, by_short[short]) for depth, mark, short in found]


def text_edges(nodes: list[tuple[int, str, str]]) -> set[tuple[str, str]]:
    """Parent -> child pairs read from the indentation: a node's parent is the last node
    printed one level up."""
    last_at: dict[int, str] = {}
    edges = set()
    for depth, _, name in nodes:
        if depth - 1 in last_at:
            edges.add((last_at[depth - 1], name))
        last_at[depth] = name
    return edges


def test_the_tree_shows_each_branch_under_its_turn(state, chunks):
    out = kvchunks(state, "tree").stdout
    assert out.splitlines()[:2] == ["12 chunk(s)", "● active in context 'default', ○ not"]
    nodes = text_nodes(out, chunks)
    assert [name for _, _, name in nodes] == ORDER
    assert [name for depth, _, name in nodes if depth == 1] == ["doc", "note"]  # the roots
    assert text_edges(nodes) == EDGES
    assert {name for _, mark, name in nodes if mark == "●"} == ACTIVE
    line = {name: next(x for x in out.splitlines() if chunks[name][:12] in x) for name in chunks}
    assert "document (system) ·" in line["doc"] and "· gpu · The secret code" in line["doc"]
    assert (
        "prompt (user) ·" in line["follow1"] and "Describe the vault in detail." in line["follow1"]
    )
    assert re.search(r"answer \(assistant\) · \d+ tokens · gpu · The vault", line["answer1a"])


def test_a_subtree_names_the_chunks_that_lead_to_it(state, chunks):
    out = kvchunks(state, "tree", chunks["follow1"][:8]).stdout
    path = " › ".join(
        f"{chunks[n][:12]} {t}"
        for n, t in [("doc", "document"), ("question", "prompt"), ("answer", "answer")]
    )
    assert out.splitlines()[0] == f"after {path}"
    nodes = text_nodes(out, chunks)
    assert nodes == [(1, "○", "follow1"), (2, "○", "answer1a"), (2, "○", "answer1b")]

    built = as_json(state, "tree", chunks["follow1"])
    assert built["ancestors"] == [chunks[n] for n in ("doc", "question", "answer")]
    assert built["roots"] == [chunks["follow1"]]
    assert [n["hash"] for n in built["nodes"]] == [
        chunks[n] for n in ("follow1", "answer1a", "answer1b")
    ]


def test_the_json_tree_lists_nodes_and_what_each_follows(state, chunks):
    built = as_json(state, "tree")
    names = {h: name for name, h in chunks.items()}
    assert [names[h] for h in built["roots"]] == ["doc", "note"]
    assert [names[n["hash"]] for n in built["nodes"]] == ORDER
    edges = {(names[n["follows"]], names[n["hash"]]) for n in built["nodes"] if n["follows"]}
    assert edges == EDGES
    for node in built["nodes"]:
        assert [names[h] for h in node["children"]] == sorted(
            (child for parent, child in EDGES if parent == names[node["hash"]]), key=ORDER.index
        )
    types = {names[n["hash"]]: n["type"] for n in built["nodes"]}
    assert types["doc"] == types["note"] == "document"
    assert types["follow2"] == "prompt" and types["answer2b"] == "answer"
    assert {names[n["hash"]] for n in built["nodes"] if n["is_active"]} == ACTIVE


def dot_graph(text: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """Node attributes and edges of the DOT that `to_dot` writes, checking every line's
    syntax on the way: one digraph, quoted ids, escaped quoted attribute values."""
    lines = text.splitlines()
    assert lines[0] == "digraph provenance {" and lines[-1] == "}"
    assert lines[1].startswith("  node [") and lines[1].endswith("];")
    nodes, edges = {}, set()
    for line in lines[2:-1]:
        node, edge = DOT_NODE.match(line), DOT_EDGE.match(line)
        assert node or edge, f"not a DOT node or edge: {line!r}"
        if node:
            nodes[node.group(1)] = node.group(2)
        else:
            edges.add(edge.groups())
    return nodes, edges


def test_dot_has_exactly_the_tree_edges(state, chunks):
    nodes, edges = dot_graph(kvchunks(state, "tree", "--format", "dot").stdout)
    names = {h: name for name, h in chunks.items()}
    assert set(nodes) == set(names)
    assert {(names[a], names[b]) for a, b in edges} == EDGES
    shapes = {names[h]: re.search(r'shape="(\w+)"', a).group(1) for h, a in nodes.items()}
    assert shapes["doc"] == shapes["note"] == "note"
    assert {shapes[n] for n in ("question", "follow1", "follow2", "other")} == {"ellipse"}
    assert {shapes[n] for n in ("answer", "answer1a", "answer2b", "other_answer")} == {"box"}
    assert {names[h] for h, a in nodes.items() if 'penwidth="3"' in a} == ACTIVE
    note_label = re.search(r'label="((?:[^"\\]|\\.)*)"', nodes[chunks["note"]]).group(1)
    assert note_label.endswith(r"gpu\nTea is served at \"five\" \\ sha…")  # escaped

    nodes, edges = dot_graph(kvchunks(state, "tree", chunks["follow2"], "--format", "dot").stdout)
    assert {names[h] for h in nodes} == {"doc", "question", "answer", *FOLLOW2}
    assert {(names[a], names[b]) for a, b in edges} == FOLLOW2_EDGES
    assert {names[h] for h, a in nodes.items() if "dashed" in a} == {"doc", "question", "answer"}


def test_json_and_dot_together_are_a_usage_error(state, chunks):
    result = kvchunks(state, "tree", "--format", "dot", "--json", status=2)
    assert result.stdout == "" and result.stderr.startswith("error: --json and --format dot")


def test_info_separates_its_own_timeline_from_later_ones(state, chunks):
    names = {h: name for name, h in chunks.items()}
    info = as_json(state, "info", chunks["doc"])
    assert [names[h] for h in info["continued_by"]] == ORDER[1:9]
    assert {names[h] for h in info["later_in_other_timelines"]} == {"other", "other_answer"}
    assert set(info["children"]) == {*info["continued_by"], *info["later_in_other_timelines"]}

    info = as_json(state, "info", chunks["follow1"])
    assert [names[h] for h in info["continued_by"]] == ["answer1a", "answer1b"]
    assert info["later_in_other_timelines"] == []

    text = kvchunks(state, "info", chunks["answer"]).stdout
    continued = text[text.index("continued by") : text.index("later in other timelines")]
    later = text[text.index("later in other timelines") : text.index("blocks")]
    for name in ORDER[3:9]:
        assert chunks[name][:12] in continued and chunks[name][:12] not in later
    for name in ("other", "other_answer"):
        assert chunks[name][:12] in later and chunks[name][:12] not in continued


def test_tree_in_the_chat(state, chunks):
    lines = f"/tree\n/tree {chunks['follow2'][:8]} --format dot\n/help\n/quit\n"
    out = kvchunks(state, "chat", stdin=lines).stdout
    nodes = text_nodes(out, chunks)
    assert [name for _, _, name in nodes] == ORDER
    assert text_edges(nodes) == EDGES
    start = out.index("digraph provenance {")
    _, edges = dot_graph(out[start : out.index("\n}\n", start) + 3])
    names = {h: name for name, h in chunks.items()}
    assert {(names[a], names[b]) for a, b in edges} == FOLLOW2_EDGES
    assert re.search(r"/tree \[HASH\] +Show how chunks were computed", out)


def record(name: str, *parents: str) -> ChunkInfo:
    """A chunk record named `name`, computed after `parents` (names), without a model."""
    return ChunkInfo(
        hash=sha(name),
        content_hash=sha(f"text of {name}"),
        token_ids=[1],
        kind="input" if name.startswith("p") else "output",
        parent_chunks=[sha(p) for p in parents],
    )


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def test_a_deleted_turn_leaves_its_continuation_under_the_turn_before():
    # p0 -> p1 -> a2, with p1 deleted: a2 hangs under p0, the last of its parents still there.
    built = provenance_tree([record("p0"), record("a2", "p0", "p1")])
    [root] = built.roots
    assert root.chunk.hash == sha("p0") and [c.chunk.hash for c in root.children] == [sha("a2")]
    assert root.children[0].follows == sha("p0")


def test_a_chain_deeper_than_the_recursion_limit():
    depth = sys.getrecursionlimit() + 100
    chain = [record(f"p{i}", *(f"p{j}" for j in range(max(0, i - 2), i))) for i in range(depth)]
    built = provenance_tree(chain, sha(f"p{depth // 2}"))
    assert len(built.ancestors) == depth // 2 and len(list(built.nodes())) == depth - depth // 2
    assert len(json.dumps(provenance_tree(chain).to_json())) > depth * 64


def test_a_piped_line_that_is_not_utf8_is_skipped_with_one_error(state):
    """Decoded line by line: the bad line is refused alone, the lines after it still run."""
    lines = b"/mode\n\xff\xfe caf\xe9\n/mode\n/quit\n"
    result = kvchunks(state, "chat", stdin=lines)
    assert result.stderr.count("error: ") == 1 and "not UTF-8" in result.stderr
    assert result.stdout.count("mode: ") == 2


def test_a_piped_file_saved_with_a_byte_order_mark_runs_its_first_command(state):
    result = kvchunks(state, "chat", stdin=b"\xef\xbb\xbf/mode\n/quit\n")
    assert result.stdout.count("mode: ") == 1 and "error" not in result.stderr


def test_completion_offers_what_each_word_may_be(state, chunks):
    """An option's value by its type; after a HASH... the next word may be another hash or
    the argument after it (move's TIER)."""
    completer = SlashCompleter(Chat(state))

    def completions(text: str) -> list:
        return list(completer.get_completions(Document(text, len(text)), CompleteEvent()))

    def offered(text: str) -> list[str]:
        """What each completion writes, without the space that follows a whole word."""
        texts = [c.text for c in completions(text)]
        assert all(t.endswith(" ") for t in texts), texts  # the next word is typed at once
        return [t.rstrip() for t in texts]

    first = chunks["follow2"][:8]
    assert offered(f"/move {first} d") == ["disk"]
    assert {"gpu", "cpu", "disk", chunks["follow1"][:12]} <= set(offered(f"/move {first} "))
    assert offered("/move ") and not {"gpu", "cpu", "disk"} & set(offered("/move "))
    assert offered("/load --role ") == list(ROLES)
    assert offered("/tree --format d") == ["dot"]
    [answer] = completions(f"/info {chunks['answer2a'][:8]}")  # what the hash is, beside it
    assert answer.display_meta_text.startswith("answer · ")


def test_dot_and_previews_keep_control_characters_and_entities_literal():
    """A NUL makes Graphviz refuse the whole graph, an escape sequence in a table would be
    acted on by the terminal, and Graphviz reads &amp; in a label as &."""
    from kvchunks.cli.render import preview
    from kvchunks.cli.tree import to_dot

    text = "Menu:\x00 fish &amp; <b>chips</b>\x1b[2J"
    chunk = ChunkInfo(hash=sha("menu"), content_hash=sha("text"), token_ids=[1], text=text)
    assert preview(text) == "Menu:\ufffd fish &amp; <b>chips</b>\ufffd[2J"
    dot = to_dot(provenance_tree([chunk]))
    assert "\x00" not in dot and "\x1b" not in dot
    assert "fish &amp;amp; <b>" in dot
    nodes, _ = dot_graph(dot)
    assert set(nodes) == {sha("menu")}
