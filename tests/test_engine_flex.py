"""The FlexAttention backend on CPU (eager) against the torch backend, the reference path:
segments that start and end inside blocks, shared blocks, RoPE-shifted segments, prefill
and batched decode; and its block lists against its own mask, which the compiled kernels
on CUDA rely on (eager FlexAttention evaluates the mask everywhere and ignores them)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_engine_reference import random_tokens

from kvchunks.engine import LLM, EngineConfig, SamplingParams
from kvchunks.engine.attention import SequenceAttention, TorchAttention
from kvchunks.engine.cuda_graphs import StepGraphs
from kvchunks.engine.flex_attention import FlexAttention, _compiled_flex_attention
from kvchunks.engine.flex_plan import QUERY_TILE, build_plan, plan_on_host

BLOCK = 16

# torch's own warnings about running flex_attention uncompiled, which is the point here (on
# CUDA the backend compiles it), and about a deprecated call inside its eager path.
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    """The same small random-weight model on both backends, with a pool of 48 small blocks
    (eager FlexAttention's cost grows with the pool)."""
    folder = tiny_checkpoint("llama")
    config = dict(num_blocks=48, block_size=BLOCK)
    flex = LLM(folder, EngineConfig(attention_backend="flex", **config))
    torch_ = LLM(folder, EngineConfig(attention_backend="torch", **config))
    assert isinstance(flex.runner.backend, FlexAttention)
    return flex, torch_


def prefill_steps(llm: LLM) -> list[torch.Tensor]:
    """Logits of prefills against stored segments: a continuation inside a block, two parts
    of one segment with a hole inside a block, a segment re-placed by a RoPE shift, and one
    segment seen twice."""
    bs = llm.config.block_size
    a, b, q = random_tokens(3 * bs - 3, 1), random_tokens(2 * bs - 2, 2), random_tokens(20, 3)
    ra = llm.prefill(a)
    rb = llm.prefill(b, context=[ra.segment], continue_after=ra.segment)
    assert rb.segment.start == len(a) % bs
    hole = bs // 2
    holed = [ra.segment.sub(0, hole - 5, bs), ra.segment.sub(hole, len(a) - hole, bs), rb.segment]
    shifted = [ra.segment, dataclasses.replace(rb.segment, shift=-20)]
    position = len(a) + len(b)
    results = [
        ra,
        rb,
        llm.prefill(q, context=holed, position=position, all_logits=True),
        llm.prefill(q, context=shifted, position=position + 5, all_logits=True),
        llm.prefill(q, context=[rb.segment, rb.segment], position=position, all_logits=True),
    ]
    for r in results:
        llm.release(r.segment)
    return [r.logits for r in results]


def test_prefill_over_segments_matches_torch_backend(engines):
    flex, torch_ = engines
    for ours, reference in zip(prefill_steps(flex), prefill_steps(torch_), strict=True):
        assert (ours - reference).abs().max().item() <= 1e-4


def test_block_lists_cover_exactly_what_the_mask_shows():
    """A (query tile, block) is listed iff a real query of the tile sees a slot of it, and
    listed as full iff every real query sees all of it; the mask shows what the keys say."""
    sequences = [
        attention(0, 3, [range(5, 20), range(40, 50), range(60, 70)]),
        attention(3, 4, [range(33, 36), range(64, 66)]),  # two segments in one block
        attention(7, 140, [range(100, 120), range(300, 440)]),  # two query tiles
    ]
    num_blocks = 32
    plan = build_plan(sequences, BLOCK, num_blocks)
    (group,) = plan.groups
    lq, slots = plan.query_rank.shape[1], num_blocks * BLOCK
    b, q, kv = torch.meshgrid(torch.arange(3), torch.arange(lq), torch.arange(slots), indexing="ij")
    shown = group.mask.mask_mod(b, 0, q, kv)
    assert torch.equal(shown, expected_visibility(sequences, lq, slots))

    pad = -lq % QUERY_TILE
    by_block = F.pad(shown, (0, 0, 0, pad)).unflatten(1, (-1, QUERY_TILE))
    by_block = by_block.unflatten(3, (num_blocks, BLOCK)).transpose(
        2, 3
    )  # [b, tile, block, q, slot]
    real = F.pad(plan.query_rank >= 0, (0, pad)).unflatten(1, (-1, QUERY_TILE))[:, :, None, :, None]
    needed = by_block.any(-1).any(-1)
    whole = (by_block | ~real).all(-1).all(-1)
    partial = listing(group.mask.kv_num_blocks, group.mask.kv_indices, num_blocks)
    full = listing(group.mask.full_kv_num_blocks, group.mask.full_kv_indices, num_blocks)
    assert not (partial & full).any()
    assert torch.equal(partial | full, needed)
    assert torch.equal(full, needed & whole)
    assert full.any() and partial.any()


def test_a_slot_seen_twice_is_left_to_the_gather_path():
    assert build_plan([attention(0, 1, [range(5, 9), range(9, 12)])], BLOCK, 4).exact
    assert not build_plan([attention(0, 1, [range(5, 9), range(5, 9)])], BLOCK, 4).exact


def test_a_plan_is_built_from_host_memory_alone():
    """The plan reads each sequence's slots and RoPE shifts from their host copies (on a GPU,
    reading the device's would wait for it): with the device's tensors on the meta device,
    which holds no data, it is the plan of the same keys in host memory alone."""
    slots = [torch.arange(5, 20), torch.cat([torch.arange(33, 36), torch.arange(64, 70)])]
    shifts = torch.tensor([0, 0, 0, 7, 7, 7, 7, 7, 0])
    tables = torch.randn(2, len(shifts), 1, 8)

    def batch(device: str) -> list[SequenceAttention]:
        first = SequenceAttention(0, 3, slots[0].to(device), False, host_key_slots=slots[0])
        second = SequenceAttention(3, 4, slots[1].to(device), False, *tables.to(device))
        second.host_key_slots, second.key_shifts = slots[1], shifts
        return [first, second]

    on_meta, on_host = plan_on_host(batch("meta"), BLOCK, 8), plan_on_host(batch("cpu"), BLOCK, 8)
    assert torch.equal(on_meta.flat, on_host.flat)
    assert on_meta.shapes == on_host.shapes and on_meta.entries == on_host.entries
    (unshifted, _), (cos, sin) = on_meta.rotations  # the shift of 7, from its first key
    assert unshifted is None and cos.device.type == "meta" and cos.shape == (1, 8)
    assert torch.equal(on_host.rotations[1][0], tables[0, 3]) and torch.equal(
        on_host.rotations[1][1], tables[1, 3]
    )


def test_a_plan_reaches_the_device_as_one_buffer():
    """Every index tensor of a plan, its block masks' lists included, is a view of one
    buffer: one copy moves it, and one refills a CUDA graph's."""
    plan = build_plan([attention(0, 3, [range(5, 20)]), attention(3, 1, [range(40, 50)])], BLOCK, 8)
    (group,) = plan.groups
    mask = group.mask
    views = [plan.query_rows, plan.query_rank, plan.ranks, plan.entry_of_block]
    views += [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices]
    buffer = plan.flat.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == buffer for t in views)
    assert all(t.storage_offset() * t.element_size() % 128 == 0 for t in views)  # aligned


def attention(query_start: int, queries: int, keys: list[range]) -> SequenceAttention:
    slots = torch.cat([torch.arange(r.start, r.stop) for r in keys])
    return SequenceAttention(query_start, query_start + queries, slots, fresh=False)


def expected_visibility(sequences: list[SequenceAttention], lq: int, slots: int) -> torch.Tensor:
    """[batch, lq, slots]: query j of n sees the keys up to the (T - n + j)-th."""
    seen = torch.zeros(len(sequences), lq, slots, dtype=torch.bool)
    for i, s in enumerate(sequences):
        n, t = s.query_end - s.query_start, s.key_slots.numel()
        for j in range(n):
            seen[i, j, s.key_slots[: t - n + j + 1]] = True
    return seen


def listing(counts: torch.Tensor, ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """FlexAttention's block lists as [batch, tile, block] bool."""
    dense = torch.zeros(*counts.shape[::2], num_blocks, dtype=torch.bool)
    for row, tile in torch.cartesian_prod(*map(torch.arange, counts.shape[::2])).tolist():
        dense[row, tile, ids[row, 0, tile, : counts[row, 0, tile]].long()] = True
    return dense


def test_auto_keeps_the_torch_backend_on_cpu(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), EngineConfig(num_blocks=4, block_size=BLOCK))
    assert type(llm.runner.backend) is TorchAttention


class EagerReplay:
    """Stands in for a CUDA graph on CPU: a replay runs the captured forward again, which
    reads the same fixed tensors a graph would."""

    def __init__(self, forward):
        self.forward, self.hidden, self.replays = forward, forward(), 0

    def replay(self) -> None:
        self.hidden.copy_(self.forward())
        self.replays += 1


class ReplayedGraphs(StepGraphs):
    def _record(self, forward):
        graph = EagerReplay(forward)
        return graph, graph.hidden


def engine_with_replayed_graphs(folder) -> tuple[LLM, ReplayedGraphs]:
    """A flex engine whose graphs replay on CPU, with a scratch block taken from its pool."""
    llm = LLM(folder, EngineConfig(attention_backend="flex", num_blocks=48, block_size=BLOCK))
    (scratch,) = llm.block_manager.allocate(1)
    runner = llm.runner
    runner.graphs = ReplayedGraphs(runner.model, runner.backend, 8, 8, scratch * BLOCK)
    return llm, runner.graphs


def decode_in_shrinking_batches(llm: LLM) -> list[list[int]]:
    """Greedy decode of five sequences in one batch, each seeing other segments: nothing,
    a chunk, pieces of two chunks sharing blocks, a chunk RoPE-shifted after another, and
    a long chunk. The last two stop first, then one sequence after another: batches of 5,
    3, 2, 1; with decode graphs, the first (shifted keys) runs eagerly, the others replay
    graphs of 8 (or 4), 2 and 1 rows."""
    bs = llm.config.block_size
    a, b = random_tokens(3 * bs - 3, 6), random_tokens(2 * bs - 2, 7)
    long = random_tokens(12 * bs + 8, 8)
    made = [llm.prefill(a), llm.prefill(b, position=0), llm.prefill(long)]
    ra, rb, rl = (r.segment for r in made)
    contexts = [
        [],
        [ra],
        [ra.sub(3, bs + 4, bs), rb.sub(5, bs // 2, bs)],
        [ra, dataclasses.replace(rb, shift=len(a))],
        [rl],
    ]
    lengths = [5, 4, 3, 2, 2]
    seqs = [
        llm.add_request(
            random_tokens(4 + i, 20 + i),
            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
            context,
        )
        for i, (context, n) in enumerate(zip(contexts, lengths, strict=True))
    ]
    while not all(s.is_finished for s in seqs):
        llm.step()
    for r in made:
        llm.release(r.segment)
    return [s.completion_token_ids for s in seqs]


def test_batched_decode_from_graph_inputs_matches_torch_backend(engines, tiny_checkpoint):
    """Batched decode on flex equals the torch backend, token for token, with decode graphs
    on: what a graph reads is refilled in place each step (padding rows in a scratch slot,
    rows of an earlier batch overwritten), and the same graphs serve a second round. On CPU
    a replay runs the captured forward again on the fixed tensors; the CUDA capture itself
    runs only on a GPU."""
    llm, graphs = engine_with_replayed_graphs(tiny_checkpoint("llama"))
    expected = decode_in_shrinking_batches(engines[1])
    assert decode_in_shrinking_batches(llm) == expected
    decode_shapes = sorted(shape for shape in graphs.captured if shape[1] == 1)
    assert decode_shapes == [(1, 1), (2, 1), (4, 1)]
    assert decode_in_shrinking_batches(llm) == expected  # the same graphs, new data
    assert all(c.graph.replays == 2 for c in graphs.captured.values())


def short_prefills(engine: LLM) -> list[torch.Tensor]:
    """Last-token logits of a document and of prompts of 5, 16, 20 and 2 * QUERY_TILE tokens
    over part of it (starting and ending inside blocks)."""
    bs = engine.config.block_size
    doc = engine.prefill(random_tokens(3 * bs - 3, 1))
    logits = [doc.logits]
    for n in (5, 16, 20, 2 * QUERY_TILE):
        turn = engine.prefill(random_tokens(n, n), context=[doc.segment.sub(3, 20, bs)])
        logits.append(turn.logits)
        engine.release(turn.segment)
    engine.release(doc.segment)
    return logits


def test_short_prefills_from_graph_inputs_match_torch_backend(engines, tiny_checkpoint):
    """Prompts of up to QUERY_TILE tokens, fresh or over part of a stored segment, from
    graphs of 16, 32 and 64 queries (rows past the prompt padded), equal the torch backend's
    logits; a longer prompt runs eagerly."""
    llm, graphs = engine_with_replayed_graphs(tiny_checkpoint("llama"))
    expected = short_prefills(engines[1])
    for ours, reference in zip(short_prefills(llm), expected, strict=True):
        assert (ours - reference).abs().max().item() <= 1e-4
    # The document (45 tokens) took a graph of 64, the prompts of 5 and 16 one of 16.
    assert sorted(graphs.captured) == [(1, 16), (1, 32), (1, 64)]
    assert graphs.captured[1, 16].graph.replays == 2


def test_the_compiled_flex_attention_may_recompile_for_many_engines():
    """Past Dynamo's default of 8 recompiles a call would run eagerly over the whole pool
    (and break a graph's capture); one process's engines need more (dtypes, pools, shapes)."""
    _compiled_flex_attention()  # compiles nothing until it is called
    assert torch._dynamo.config.recompile_limit >= 64
