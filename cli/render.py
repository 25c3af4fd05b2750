"""How chunks, contexts and statistics look: rich tables for people, plain dicts for `--json`."""

from __future__ import annotations

import json
import time
import unicodedata
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from kvchunks.vocabulary import TIERS, recompute_fraction

if TYPE_CHECKING:
    from kvchunks import ChunkInfo, ContextView, GenerationResult

SHORT = 12  # hash characters shown; any unique prefix of 4 or more works as a reference


def short(chunk_hash: str) -> str:
    return chunk_hash[:SHORT]


def preview(text: str, width: int = 60) -> str:
    """The text on one line, cut to `width`; a control character (an escape sequence a
    terminal would act on, a NUL that Graphviz refuses) shows as �."""
    flat = " ".join(text.split())
    flat = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in flat)
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def describe(chunk: ChunkInfo) -> str:
    """One line naming a chunk: short hash, token count and what it is."""
    return f"{short(chunk.hash)} ({chunk.token_count} tokens, {type_label(chunk)})"


def kind_label(chunk: ChunkInfo) -> str:
    return f"{chunk.kind}, interrupted" if chunk.metadata.get("interrupted") else chunk.kind


def type_label(chunk: ChunkInfo) -> str:
    """What the chunk is in a conversation (document, prompt, answer, composed, split), as
    `tree` and the web page name it."""
    kind = chunk.type
    return f"{kind}, interrupted" if chunk.metadata.get("interrupted") else kind


def add_row(table: Table, *cells: str) -> None:
    """A row of plain text: chunk text, tags and paths may contain [brackets] (not markup)."""
    table.add_row(*(Text(c) for c in cells))


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, default=str)


# -- tables -----------------------------------------------------------------------------------


def chunks_table(chunks: list[ChunkInfo], title: str | None = None) -> Table:
    table = _chunk_columns("active", title)
    for c in chunks:
        _add_chunk_row(table, c, "yes" if c.is_active else "")
    table.caption = f"{len(chunks)} chunk(s)"
    return table


def context_table(view: ContextView) -> Table:
    """The active chunks in layout order, and their total against the context window."""
    table = _chunk_columns("#", f"context '{view.name}' (mode {view.mode})")
    for i, c in enumerate(view.chunks, 1):
        _add_chunk_row(table, c, str(i))
    table.caption = (
        f"{len(view.chunks)} active chunk(s), {view.token_count} of {view.window} tokens "
        f"in the context window; auto-activate {'on' if view.auto_activate else 'off'}"
    )
    return table


def _chunk_columns(mark: str, title: str | None) -> Table:
    """One column for what a chunk is (its type, not its kind and role) and tags that may
    wrap: in an 80-column terminal the text keeps a readable width."""
    table = Table(title=title, title_justify="left", caption_justify="left", expand=True)
    table.add_column(mark, justify="right", no_wrap=True)
    table.add_column("hash", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("tier", no_wrap=True)
    table.add_column("tags")
    table.add_column("text", overflow="ellipsis", no_wrap=True, ratio=1)
    return table


def _add_chunk_row(table: Table, c: ChunkInfo, mark: str) -> None:
    add_row(
        table,
        mark,
        short(c.hash),
        type_label(c),
        str(c.token_count),
        c.tier,
        ", ".join(c.tags),
        preview(c.text),
    )


def info_table(
    chunk: ChunkInfo,
    parents: list[ChunkInfo],
    continued: list[ChunkInfo],
    elsewhere: list[ChunkInfo],
    same_text: list[ChunkInfo],
) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows = [
        ("hash", chunk.hash),
        ("content hash", chunk.content_hash),
        ("kind", f"{kind_label(chunk)} ({chunk.layout})"),
        ("role", chunk.role),
        ("tokens", f"{chunk.token_count} from position {chunk.position}"),
        ("tier", chunk.tier),
        ("active", "yes" if chunk.is_active else "no"),
        ("tags", ", ".join(chunk.tags) or "-"),
        ("created", _when(chunk.created_at)),
        ("references", str(chunk.ref_count)),
        ("metadata", _pairs(_readable(chunk.metadata))),
        ("generation", _pairs(chunk.generation_params or {})),
        ("parents", _chunk_lines(parents)),
        ("continued by", _chunk_lines(continued)),
        ("later in other timelines", _chunk_lines(elsewhere)),
        ("same text", _chunk_lines(same_text)),
        ("sources", "\n".join(f"{short(s.hash)} [{s.offset}:+{s.length}]" for s in chunk.sources)),
        ("blocks", _segments(chunk)),
        ("text", preview(chunk.text, 400)),
    ]
    for name, value in rows:
        if value:
            add_row(table, name, value)
    return table


def stats_table(stats: dict) -> Table:
    """The figures of ContextManager.stats() as a two-column table."""
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    pool = stats["pool"]
    if pool is None:
        add_row(table, "pool", "engine not started in this process")
    else:
        used = pool["blocks"] - pool["free"]
        add_row(
            table,
            "pool",
            f"{used} of {pool['blocks']} blocks used ({pool['block_size']} tokens each), "
            f"{pool['free']} free",
        )
    tiers = stats["tiers"]
    per_tier = ", ".join(f"{t} {tiers.get(t, 0)}" for t in TIERS)
    add_row(table, "chunks", f"{sum(tiers.values())} ({per_tier}), {stats['active']} active")
    counters = ", ".join(f"{k} {v}" for k, v in sorted(stats["counters"].items()))
    add_row(table, "store", counters or "no loads or recomputes yet")
    last = stats["last_generation"]
    if last is None:
        add_row(table, "last generation", "none yet")
    else:
        add_row(
            table,
            "last generation",
            f"{last['tokens']} tokens, time to first token {last['ttft_s']:.3f} s, "
            f"{last['tokens_per_s']:.1f} tokens/s{', interrupted' if last['interrupted'] else ''}",
        )
    return table


def generation_footer(result: GenerationResult) -> str:
    outputs = ", ".join(short(c.hash) for c in result.output_chunks) or "none"
    state = result.finish_reason
    if result.interrupted:
        state = "interrupted; partial answer kept" if outputs != "none" else "interrupted"
    mode = _mode_named(result.mode, result.recompute)
    return (
        f"[prompt {short(result.prompt_chunk.hash)} · output {outputs} · "
        f"{len(result.token_ids)} tokens · {state} · {mode} · "
        f"{result.tokens_reused} reused, {result.tokens_recomputed} recomputed · "
        f"ttft {result.ttft_s:.2f} s · {result.tokens_per_s:.1f} tokens/s]"
    )


def mode_line(mode: str | None, recompute: float | None, settings: dict) -> str:
    """The mode generations use: this run's choice, else the context's setting (named too
    when this run's mode or fraction differs from it)."""
    setting = _mode_named(settings["mode"], settings["recompute"])
    chosen = _mode_named(
        mode or settings["mode"], settings["recompute"] if recompute is None else recompute
    )
    if chosen != setting:
        chosen += f" for this session (the context's setting is {setting})"
    return chosen


def _mode_named(mode: str, recompute: float | None) -> str:
    if mode != "realign":
        return mode
    return f"{mode} (recompute {recompute_fraction(mode, recompute):g})"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _readable(metadata: dict) -> dict:
    """Metadata as a person reads it: times as dates, empty values left out (a standalone
    chunk combines nothing)."""
    shown = {k: v for k, v in metadata.items() if v not in ("", None)}
    if isinstance(shown.get("timestamp"), int | float):
        shown["timestamp"] = _when(shown["timestamp"])
    return shown


def _pairs(values: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in values.items())


def _chunk_lines(chunks: list[ChunkInfo]) -> str:
    return "\n".join(f"{describe(c)} {preview(c.text, 40)}" for c in chunks)


def _segments(chunk: ChunkInfo) -> str:
    if not chunk.segments and chunk.tier == "gpu":  # the tier another process recorded
        return "in the pool of the process that holds it, not in this one's"
    if not chunk.segments:
        return "not in the pool"
    return "\n".join(
        f"blocks {list(s.blocks)} from slot {s.start}, {s.length} tokens at position "
        f"{s.position}" + (f", shift {s.shift}" if s.shift else "")
        for s in chunk.segments
    )
