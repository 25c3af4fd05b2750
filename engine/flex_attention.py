"""FlexAttention backend: attention that reads the paged pool in place, through block lists.

The pool's flat slots are the key axis of each FlexAttention call. A block mask lists, per
sequence and query tile, the pool blocks its visible keys lie in, so the kernel reads those
blocks and no others: nothing is gathered. Inside a listed block, `mask_mod` looks each slot
up in a small table of ranks (the slot's index in the sequence's key order, or "not seen"),
which covers segments that start or end mid-block, blocks that several segments share and
the causal rule on the sequence's own tokens alike. Blocks every query of a tile sees whole
are listed as full and skip the mask.

Segments re-placed by a RoPE delta (`shift`) cannot be rotated by `score_mod`, which sees
only the finished score. Rotating the query instead is the same product,
R(-d)q . k = q . R(d)k, so the keys are split into groups that share one rotation, each
group is attended in its own call with its rotated queries, and the calls are merged by
their log-sum-exp. Without shifted segments there is one group and one call.

Compiled with `torch.compile` on CUDA. On CPU it runs eagerly, where FlexAttention
evaluates the mask over the whole pool: a check of the block lists and masks against the
torch backend, not a fast path (the torch backend stays the CPU default).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from kvchunks.engine.attention import AttentionMetadata, SequenceAttention, TorchAttention
from kvchunks.engine.rotary import rotate

QUERY_TILE = 128  # FlexAttention's query block
# The compiled kernels read keys in tiles of this many; a pool block must hold whole tiles.
KERNEL_BLOCK = 128
NOT_SEEN = torch.iinfo(torch.int32).max  # rank of a slot the sequence does not see


@dataclass
class KeyGroup:
    """Keys that share one RoPE delta: their block mask and the query rotation it needs."""

    mask: BlockMask
    cos: torch.Tensor | None = None  # [1, head_dim] of the delta; None: not rotated
    sin: torch.Tensor | None = None


@dataclass
class FlexPlan:
    """One batch laid out for FlexAttention, built once per step and used by every layer."""

    query_rows: torch.Tensor  # [B, Lq] row of each query in the flat batch; padding: N
    query_rank: torch.Tensor  # [B, Lq] how many keys each query sees, less one; padding: -1
    table: SlotTable
    groups: list[KeyGroup]
    # A slot seen twice by one sequence (a chunk active twice in `reuse`) holds one rank:
    # such a batch is attended by the gather path, which sees it twice, as it should.
    exact: bool = True


def flex_usable(device: str, block_size: int) -> bool:
    """Whether the backend can run: eagerly on CPU, compiled on CUDA when a pool block is a
    whole number of the kernels' key tiles."""
    return not device.startswith("cuda") or block_size % KERNEL_BLOCK == 0


class FlexAttention(TorchAttention):
    padded_decode = False  # the block lists serve any mix of key counts

    def __init__(self, kv_cache: torch.Tensor, compiled: bool):
        super().__init__(kv_cache)
        self.block_size = kv_cache.shape[3]
        self.attend = _compiled_flex_attention() if compiled else flex_attention
        self._planned: tuple[AttentionMetadata, FlexPlan] | None = None

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        plan = self.plan(meta)
        if not plan.exact:
            return super().forward(layer, q, k, v, meta)
        k_cache, v_cache = self.store(layer, k, v, meta)
        keys, values = _as_heads(k_cache), _as_heads(v_cache)
        # Padded queries read and write one row past the batch: no data-dependent shapes, so
        # a CUDA graph can capture this.
        q = F.pad(q, (0, 0, 0, 0, 0, 1))
        if len(plan.groups) == 1:
            out = self._attend(q, keys, values, plan, plan.groups[0], lse=False)
        else:
            parts = [self._attend(q, keys, values, plan, g, lse=True) for g in plan.groups]
            out = _merge(*zip(*parts, strict=True))
        # Zeros, not uninitialized memory: rows no query writes (a graph's padding past a
        # short prompt) go on through the layers, and their KV into the scratch slot.
        result = torch.zeros_like(q)
        result[plan.query_rows.flatten()] = out.transpose(1, 2).flatten(0, 1)
        return result[:-1]

    def _attend(self, q, keys, values, plan: FlexPlan, group: KeyGroup, lse: bool):
        """One group's attention [B, heads, Lq, head_dim] (and its log-sum-exp with lse)."""
        rows = q if group.cos is None else rotate(q, group.cos, -group.sin)
        queries = rows[plan.query_rows].transpose(1, 2)
        aux = AuxRequest(lse=True) if lse else None
        out = self.attend(
            queries, keys, values, block_mask=group.mask, enable_gqa=True, return_aux=aux
        )
        return (out[0], out[1].lse) if lse else out

    def use(self, meta: AttentionMetadata, plan: FlexPlan) -> None:
        """Attend with `plan` for `meta` (a CUDA graph's fixed plan, refilled per replay)."""
        self._planned = (meta, plan)

    def plan(self, meta: AttentionMetadata) -> FlexPlan:
        """The plan of this step's batch, built on the first layer (the cache holds meta
        itself, so its identity cannot be reused while cached)."""
        if self._planned is None or self._planned[0] is not meta:
            self._planned = (meta, build_plan(meta.sequences, self.block_size, self.num_blocks))
        return self._planned[1]

    @property
    def num_blocks(self) -> int:
        return self.k_slots.shape[1] // self.block_size


@functools.cache
def _compiled_flex_attention():
    """One compiled FlexAttention for every engine in the process, so they share kernels."""
    # Each dtype, pool size and graph shape of those engines may add a compile; past
    # Dynamo's default limit of 8 a call would run FlexAttention eagerly, over the whole
    # pool (and break a graph's capture).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention)


def _as_heads(cache: torch.Tensor) -> torch.Tensor:
    """A layer's flat slots [slots, kv_heads, D] as FlexAttention's [1, kv_heads, slots, D]
    (a view: the kernel reads the pool where it is)."""
    return cache.unsqueeze(0).transpose(1, 2)


def _merge(outs: tuple[torch.Tensor, ...], lses: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Attention over the union of disjoint key groups from each group's output and
    log-sum-exp. A query that sees nothing of a group has lse -inf there and weight 0."""
    lse = torch.stack(lses)  # [G, B, heads, Lq]
    weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).nan_to_num(0.0)
    total = sum(w[..., None] * o.float() for w, o in zip(weights, outs, strict=True))
    return total.to(outs[0].dtype)


def build_plan(
    sequences: list[SequenceAttention],
    block_size: int,
    num_blocks: int,
    width: int = 0,
    queries_width: int = 0,
) -> FlexPlan:
    """Block lists and slot ranks for every (rotation group, sequence) row of the batch,
    with room for at least `width` blocks and `queries_width` queries per row (a CUDA
    graph's fixed shape).

    Built in host memory and moved to the device once made: on a GPU its many small steps,
    some of which need their results' sizes, would each launch a kernel or wait for one."""
    device = sequences[0].key_slots.device
    lengths = torch.tensor([s.key_slots.numel() for s in sequences])
    queries = torch.tensor([s.query_end - s.query_start for s in sequences])
    starts = torch.tensor([s.query_start for s in sequences])
    query_at = torch.arange(max(int(queries.max()), queries_width))
    valid = query_at[None, :] < queries[:, None]
    # Queries are the last of the keys, and each sees the keys up to its own.
    query_rank = torch.where(valid, (lengths - queries)[:, None] + query_at, -1)
    group_of_key, rotations = _rotation_groups(sequences)
    num_rows = len(rotations) * len(sequences)
    owner = _owner(lengths)
    rows = group_of_key * len(sequences) + owner
    slots = torch.cat([s.key_slots for s in sequences]).cpu()
    table = _slot_table(rows, slots, _rank(lengths, owner), num_rows, block_size, num_blocks, width)
    lists = _block_lists(table, *_query_tiles(query_rank, len(rotations)))
    query_rows = (starts[:, None] + query_at).masked_fill(~valid, int(queries.sum()))
    exact = int((table.ranks != NOT_SEEN).sum()) == slots.numel()
    table = table.to(device)
    lists = tuple((counts.to(device), ids.to(device)) for counts, ids in lists)
    query_rank = query_rank.to(device)
    groups = [
        KeyGroup(_block_mask(table, lists, part, query_rank, block_size), *rotation)
        for part, rotation in zip(_parts(len(sequences), len(rotations)), rotations, strict=True)
    ]
    return FlexPlan(query_rows.to(device), query_rank, table, groups, exact)


def _owner(lengths: torch.Tensor) -> torch.Tensor:
    """For each key of the concatenated batch, the index of its sequence: a running count
    of the sequences begun (repeat_interleave would run a host thread per sequence)."""
    begun = torch.zeros(int(lengths.sum()), dtype=torch.long)
    begun.index_add_(0, lengths.cumsum(0)[:-1], torch.ones(len(lengths) - 1, dtype=torch.long))
    return begun.cumsum(0)


def _rank(lengths: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """For each key of the concatenated batch, its index within its sequence."""
    return torch.arange(len(owner)) - (lengths.cumsum(0) - lengths)[owner]


def _parts(batch: int, groups: int) -> list[slice]:
    """The rows of each rotation group: group g holds rows g * batch + sequence."""
    return [slice(g * batch, (g + 1) * batch) for g in range(groups)]


def _rotation_groups(sequences: list[SequenceAttention]) -> tuple[torch.Tensor, list[tuple]]:
    """Each key's group (keys rotated alike), and each group's (cos, sin) or (None, None)."""
    total = sum(s.key_slots.numel() for s in sequences)
    shifted = [s.key_cos for s in sequences if s.key_cos is not None]
    if not shifted:
        return torch.zeros(total, dtype=torch.long), [(None, None)]
    like = shifted[0][:1, 0]  # [1, head_dim]
    kept = torch.cat([torch.ones_like(like), torch.zeros_like(like)], dim=-1)  # no rotation
    tables = [
        kept.expand(s.key_slots.numel(), -1)
        if s.key_cos is None
        else torch.cat([s.key_cos, s.key_sin], dim=-1)[:, 0]
        for s in sequences
    ]
    unique, group_of_key = torch.unique(torch.cat(tables), dim=0, return_inverse=True)
    cos, sin = unique[:, None].chunk(2, dim=-1)  # each [groups, 1, head_dim]
    return group_of_key.cpu(), list(zip(cos, sin, strict=True))


@dataclass
class SlotTable:
    """Per row (a rotation group of one sequence): the pool blocks its keys lie in (its
    entries) and, per entry and slot, the key's rank. Entry `entries` of every row is the
    empty one, all NOT_SEEN, which every unlisted block maps to."""

    ranks: torch.Tensor  # [rows, entries + 1, block_size] int32
    entry_of_block: torch.Tensor  # [rows, num_blocks] int32
    blocks: torch.Tensor  # [rows, entries] pool block of each entry
    listed: torch.Tensor  # [rows, entries] bool: entry in use

    def to(self, device: torch.device) -> SlotTable:
        return SlotTable(
            *(t.to(device) for t in (self.ranks, self.entry_of_block, self.blocks, self.listed))
        )


def _slot_table(
    rows: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    num_rows: int,
    block_size: int,
    num_blocks: int,
    width: int,
) -> SlotTable:
    """The table of the keys of every row: `rows`, `slots` and `ranks` give each key's."""
    block, offset = slots // block_size, slots % block_size
    unique, entry = torch.unique(rows * num_blocks + block, return_inverse=True)
    row_of, block_of = unique // num_blocks, unique % num_blocks
    per_row = torch.bincount(row_of, minlength=num_rows)
    width = max(int(per_row.max()), width)
    local = torch.arange(len(unique), device=slots.device) - (per_row.cumsum(0) - per_row)[row_of]
    table = torch.full(
        (num_rows, width + 1, block_size), NOT_SEEN, dtype=torch.int32, device=slots.device
    )
    table[rows, local[entry], offset] = ranks.to(torch.int32)
    entry_of_block = torch.full(
        (num_rows, num_blocks), width, dtype=torch.int32, device=slots.device
    )
    entry_of_block[row_of, block_of] = local.to(torch.int32)
    blocks = torch.zeros(num_rows, width, dtype=torch.int32, device=slots.device)
    blocks[row_of, local] = block_of.to(torch.int32)
    listed = torch.arange(width, device=slots.device) < per_row[:, None]
    return SlotTable(table, entry_of_block, blocks, listed)


def _query_tiles(query_rank: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest rank of the real queries in each query tile, per row."""
    pad = -query_rank.shape[1] % QUERY_TILE
    ranks = F.pad(query_rank, (0, pad), value=-1).unflatten(1, (-1, QUERY_TILE))
    lowest = ranks.masked_fill(ranks < 0, NOT_SEEN).amin(-1)
    return lowest.repeat(groups, 1), ranks.amax(-1).repeat(groups, 1)


def _block_lists(table: SlotTable, lowest: torch.Tensor, highest: torch.Tensor) -> tuple:
    """Per row and query tile, the blocks to read with the mask (some queries see only part
    of them) and the full ones (every query sees every slot): each (counts, block ids)."""
    ranks = table.ranks[:, :-1]
    first, last = ranks.amin(-1)[:, None], ranks.amax(-1)[:, None]  # [rows, 1, entries]
    needed = table.listed[:, None] & (first <= highest[..., None])
    full = needed & (last <= lowest[..., None])
    return _listing(needed & ~full, table), _listing(full, table)


def _listing(chosen: torch.Tensor, table: SlotTable) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [rows, tiles, entries] as FlexAttention's counts [rows, 1, tiles] and block ids
    [rows, 1, tiles, num_blocks], the chosen ones first (the kernels expect a list as long
    as the key axis has blocks, and read only the first `count` of it)."""
    order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)
    ids = table.blocks[:, None].expand(chosen.shape).gather(-1, order)
    ids = F.pad(ids, (0, table.entry_of_block.shape[1] - ids.shape[-1]))
    return chosen.sum(-1, dtype=torch.int32)[:, None], ids[:, None].contiguous()


def _block_mask(
    table: SlotTable, lists: tuple, part: slice, query_rank: torch.Tensor, block_size: int
) -> BlockMask:
    (counts, ids), (full_counts, full_ids) = lists
    ranks, entry_of_block = table.ranks[part], table.entry_of_block[part]

    def seen(b, h, q_idx, kv_idx):
        entry = entry_of_block[b, kv_idx // block_size]
        return ranks[b, entry, kv_idx % block_size] <= query_rank[b, q_idx]

    return BlockMask.from_kv_blocks(
        counts[part],
        ids[part],
        full_counts[part],
        full_ids[part],
        BLOCK_SIZE=(QUERY_TILE, block_size),
        mask_mod=seen,
        seq_lengths=(query_rank.shape[1], entry_of_block.shape[1] * block_size),
        compute_q_blocks=False,
    )
