"""FlexAttention's plan of a batch: which pool blocks each sequence's queries read, and
which slots of them each query sees, built in host memory once per step.

A block mask lists, per sequence and query tile, the pool blocks its visible keys lie in,
so the kernel reads those blocks and no others. Inside a listed block, `mask_mod` looks
each slot up in a small table of ranks (the slot's index in the sequence's key order, or
"not seen"), which covers segments that start or end mid-block, blocks that several
segments share and the causal rule on the sequence's own tokens alike. Blocks every query
of a tile sees whole are listed as full and skip the mask. Keys re-placed by a RoPE delta
form groups that share one rotation, each with its own rows (see flex_attention).

The plan is built on the host from the sequences' host copies of their slots and shifts,
into one buffer that crosses to the device in one copy (or, for a CUDA graph, is copied
into the graph's own): on a GPU its many small steps, some of which need their results'
sizes, would each launch a kernel or wait for one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from kvchunks.engine.attention import SequenceAttention

QUERY_TILE = 128  # FlexAttention's query block
NOT_SEEN = torch.iinfo(torch.int32).max  # rank of a slot the sequence does not see
ALIGN = 32  # int32 elements in 128 bytes


@dataclass
class KeyGroup:
    """Keys that share one RoPE delta: their block mask and the query rotation it needs."""

    mask: BlockMask
    cos: torch.Tensor | None = None  # [1, head_dim] of the delta; None: not rotated
    sin: torch.Tensor | None = None


@dataclass
class FlexPlan:
    """One batch laid out for FlexAttention, built once per step and used by every layer.
    Its index tensors are views of `flat`, so the plan reaches the device in one copy, and
    a CUDA graph's plan is refilled by one."""

    flat: torch.Tensor  # int32: every index tensor of the plan, one after another
    query_rows: torch.Tensor  # [B, Lq] row of each query in the flat batch; padding: N
    query_rank: torch.Tensor  # [B, Lq] how many keys each query sees, less one; padding: -1
    # Per row (a rotation group of one sequence), the pool blocks its keys lie in are its
    # entries: the rank of the key in each entry's slots (NOT_SEEN where there is none),
    # and each pool block's entry. Entry `entries` of every row is the empty one, all
    # NOT_SEEN, which every unlisted block maps to.
    ranks: torch.Tensor  # [rows, entries + 1, block_size]
    entry_of_block: torch.Tensor  # [rows, num_blocks]
    groups: list[KeyGroup]
    entries: int  # blocks listed per row (a graph's plan has room for a fixed number)
    # A slot seen twice by one sequence (a chunk active twice in `reuse`) holds one rank:
    # such a batch is attended by the gather path, which sees it twice, as it should.
    exact: bool


@dataclass
class HostPlan:
    """A plan's index tensors, built in host memory in one buffer, before they cross to the
    device (see plan_on_host)."""

    flat: torch.Tensor  # int32
    shapes: list[tuple[int, ...]]  # query_rows, query_rank, ranks, entry_of_block, 2 lists
    rotations: list[tuple]  # each key group's (cos, sin) on the device, or (None, None)
    entries: int
    exact: bool

    def to(self, device: torch.device) -> FlexPlan:
        """The plan on the device: one copy, then views."""
        flat = self.flat.to(device)
        query_rows, query_rank, ranks, entry_of_block, *lists = _views(flat, self.shapes)
        parts = _parts(len(query_rows), len(self.rotations))
        groups = [
            KeyGroup(_block_mask(ranks, entry_of_block, lists, part, query_rank), *rotation)
            for part, rotation in zip(parts, self.rotations, strict=True)
        ]
        plan = (query_rows, query_rank, ranks, entry_of_block, groups, self.entries, self.exact)
        return FlexPlan(flat, *plan)


def build_plan(sequences: list[SequenceAttention], block_size: int, num_blocks: int) -> FlexPlan:
    """The plan of a batch, on the device its keys are on."""
    host = plan_on_host(sequences, block_size, num_blocks)
    return host.to(sequences[0].key_slots.device)


def plan_on_host(
    sequences: list[SequenceAttention],
    block_size: int,
    num_blocks: int,
    width: int = 0,
    queries_width: int = 0,
) -> HostPlan:
    """Block lists and slot ranks for every (rotation group, sequence) row of the batch,
    with room for at least `width` blocks and `queries_width` queries per row (a CUDA
    graph's fixed shape), in host memory (see the module's docstring)."""
    lengths = np.array([s.key_slots.numel() for s in sequences])
    queries = np.array([s.query_end - s.query_start for s in sequences])
    starts = np.array([s.query_start for s in sequences])
    query_at = np.arange(max(queries.max(), queries_width))
    valid = query_at[None, :] < queries[:, None]
    group_of_key, rotations = _rotation_groups(sequences, lengths)
    owner = np.repeat(np.arange(len(sequences)), lengths)
    keys = _Keys(
        group_of_key * len(sequences) + owner,
        np.concatenate([s.slots_on_host().numpy() for s in sequences]),
        np.arange(len(owner)) - (lengths.cumsum() - lengths)[owner],  # index in its sequence
    )
    num_rows = len(rotations) * len(sequences)
    entries = _Entries.of(keys, num_rows, block_size, num_blocks, width)
    batch, tiles = len(sequences), -(-len(query_at) // QUERY_TILE)
    rows_shape, lists_shape = (batch, len(query_at)), (num_rows, 1, tiles)
    shapes = [
        rows_shape,
        rows_shape,
        (num_rows, entries.width + 1, block_size),
        (num_rows, num_blocks),
        *[lists_shape, (*lists_shape, num_blocks)] * 2,
    ]
    flat = np.zeros(_starts(shapes)[-1], dtype=np.int32)
    query_rows, query_rank, ranks, entry_of_block, *lists = _views(flat, shapes)
    query_rows[:] = np.where(valid, starts[:, None] + query_at, queries.sum())
    # Queries are the last of the keys, and each sees the keys up to its own.
    query_rank[:] = np.where(valid, (lengths - queries)[:, None] + query_at, -1)
    entries.fill(keys, ranks, entry_of_block)
    entries.list_blocks(*_query_tiles(query_rank, len(rotations)), lists)
    return HostPlan(torch.from_numpy(flat), shapes, rotations, entries.width, entries.exact)


def _views(flat, shapes: list[tuple[int, ...]]) -> list:
    """flat (a tensor or an array) cut into views of these shapes, in order."""
    return [
        flat[start : start + math.prod(shape)].reshape(shape)
        for start, shape in zip(_starts(shapes)[:-1], shapes, strict=True)
    ]


def _starts(shapes: list[tuple[int, ...]]) -> list[int]:
    """Where each part of a plan's buffer starts, and last its length: every part on a
    128-byte boundary, as compiled kernels expect of the tensors they read."""
    starts = [0]
    for shape in shapes:
        starts.append(starts[-1] + -(-math.prod(shape) // ALIGN) * ALIGN)
    return starts


def _parts(batch: int, groups: int) -> list[slice]:
    """The rows of each rotation group: group g holds rows g * batch + sequence."""
    return [slice(g * batch, (g + 1) * batch) for g in range(groups)]


def _rotation_groups(
    sequences: list[SequenceAttention], lengths: np.ndarray
) -> tuple[np.ndarray, list[tuple]]:
    """Each key's group (keys shifted alike), and each group's (cos, sin) [1, head_dim], or
    (None, None) for the keys not shifted. The groups come from the shifts in host memory;
    each rotation is a view of the device's tables at the group's first key."""
    if all(s.key_shifts is None for s in sequences):
        return np.zeros(lengths.sum(), dtype=np.int64), [(None, None)]
    shifts = np.concatenate(
        [
            np.zeros(n, np.int64) if s.key_shifts is None else s.key_shifts.numpy()
            for s, n in zip(sequences, lengths.tolist(), strict=True)
        ]
    )
    values, firsts, group_of_key = np.unique(shifts, return_index=True, return_inverse=True)
    ends = lengths.cumsum()
    rotations = []
    for value, first in zip(values.tolist(), firsts.tolist(), strict=True):
        index = int(np.searchsorted(ends, first, side="right"))
        owner, key = sequences[index], first - int(ends[index] - lengths[index])
        rotations.append((None, None) if value == 0 else (owner.key_cos[key], owner.key_sin[key]))
    return group_of_key, rotations


@dataclass
class _Keys:
    """Every key of the batch, one element each: its row, pool slot and rank in its row."""

    rows: np.ndarray
    slots: np.ndarray
    ranks: np.ndarray


@dataclass
class _Entries:
    """The pool blocks each row's keys lie in, its entries: one sort of the keys by (row,
    slot) finds them and the slots seen twice."""

    key_entry: np.ndarray  # each key's entry, numbered across all rows
    row_of: np.ndarray  # per entry: its row, pool block and index within its row
    block_of: np.ndarray
    local: np.ndarray
    first: np.ndarray  # per entry: its lowest rank, and its highest where the row sees
    last: np.ndarray  # every slot of the block (NOT_SEEN where it does not)
    width: int  # entries per row, padded
    exact: bool  # no row sees a slot twice

    @classmethod
    def of(
        cls, keys: _Keys, num_rows: int, block_size: int, num_blocks: int, width: int
    ) -> _Entries:
        row_slots, slot_of_key = np.unique(
            keys.rows * (num_blocks * block_size) + keys.slots, return_inverse=True
        )
        row_blocks = row_slots // block_size
        new_entry = np.concatenate([[True], row_blocks[1:] != row_blocks[:-1]])
        entry_of_slot = new_entry.cumsum() - 1
        unique = row_blocks[new_entry]
        key_entry = entry_of_slot[slot_of_key]
        row_of = unique // num_blocks
        per_row = np.bincount(row_of, minlength=num_rows)
        local = np.arange(len(unique)) - (per_row.cumsum() - per_row)[row_of]
        first = np.full(len(unique), NOT_SEEN)
        np.minimum.at(first, key_entry, keys.ranks)
        last = np.full(len(unique), -1)
        np.maximum.at(last, key_entry, keys.ranks)
        whole = np.bincount(entry_of_slot, minlength=len(unique)) == block_size
        return cls(
            key_entry,
            row_of,
            unique % num_blocks,
            local,
            first,
            np.where(whole, last, NOT_SEEN),
            max(int(per_row.max()), width),
            len(row_slots) == len(keys.slots),
        )

    def fill(self, keys: _Keys, ranks: np.ndarray, entry_of_block: np.ndarray) -> None:
        """Write the plan's slot ranks and each pool block's entry (see FlexPlan)."""
        ranks[:] = NOT_SEEN
        ranks[keys.rows, self.local[self.key_entry], keys.slots % ranks.shape[-1]] = keys.ranks
        entry_of_block[:] = self.width
        entry_of_block[self.row_of, self.block_of] = self.local

    def list_blocks(self, lowest: np.ndarray, highest: np.ndarray, lists: list) -> None:
        """Per row and query tile, the blocks to read with the mask (some queries see only
        part of them) and the full ones (every query sees every slot), written into
        `lists`: counts and block ids of each. An entry not in use has first = NOT_SEEN, so
        no query needs it."""
        by_entry = np.full((3, len(lowest), self.width), NOT_SEEN)
        by_entry[2] = 0  # the block of an entry not in use, read by no kernel
        at = (self.row_of, self.local)
        by_entry[0][at], by_entry[1][at], by_entry[2][at] = self.first, self.last, self.block_of
        first, last, blocks = by_entry[:, :, None]  # each [rows, 1, entries]
        needed = first <= highest[..., None]
        full = needed & (last <= lowest[..., None])
        _listing(needed & ~full, blocks[:, 0], *lists[:2])
        _listing(full, blocks[:, 0], *lists[2:])


def _query_tiles(query_rank: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest rank of the real queries in each query tile, per row."""
    batch, queries = query_rank.shape
    ranks = np.full((batch, -(-queries // QUERY_TILE) * QUERY_TILE), -1)
    ranks[:, :queries] = query_rank
    ranks = ranks.reshape(batch, -1, QUERY_TILE)
    lowest = np.where(ranks < 0, NOT_SEEN, ranks).min(-1)
    return np.tile(lowest, (groups, 1)), np.tile(ranks.max(-1), (groups, 1))


def _listing(chosen: np.ndarray, blocks: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> None:
    """chosen [rows, tiles, entries] of blocks [rows, entries] written as FlexAttention's
    counts [rows, 1, tiles] and block ids [rows, 1, tiles, num_blocks], the chosen ones
    first (the kernels expect a list as long as the key axis has blocks, and read only the
    first `count` of it)."""
    order = np.argsort(~chosen, axis=-1, kind="stable")
    counts[:, 0] = chosen.sum(-1)
    ids[:] = 0
    ids[:, 0, :, : chosen.shape[-1]] = np.take_along_axis(
        np.broadcast_to(blocks[:, None], chosen.shape), order, -1
    )


def _block_mask(
    ranks: torch.Tensor,
    entry_of_block: torch.Tensor,
    lists: list[torch.Tensor],
    part: slice,
    query_rank: torch.Tensor,
) -> BlockMask:
    counts, ids, full_counts, full_ids = (t[part] for t in lists)
    ranks, entry_of_block = ranks[part], entry_of_block[part]
    block_size = ranks.shape[-1]

    def seen(b, h, q_idx, kv_idx):
        entry = entry_of_block[b, kv_idx // block_size]
        return ranks[b, entry, kv_idx % block_size] <= query_rank[b, q_idx]

    return BlockMask.from_kv_blocks(
        counts,
        ids,
        full_counts,
        full_ids,
        BLOCK_SIZE=(QUERY_TILE, block_size),
        mask_mod=seen,
        seq_lengths=(query_rank.shape[1], entry_of_block.shape[1] * block_size),
        compute_q_blocks=False,
    )
