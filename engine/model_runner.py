"""Holds the model and the KV pool; turns a batch of sequences into one forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from kvchunks.common import InvalidInput
from kvchunks.engine.attention import (
    AttentionMetadata,
    DecodeBatch,
    SequenceAttention,
    TorchAttention,
)
from kvchunks.engine.config import EngineConfig, ModelConfig
from kvchunks.engine.cuda_graphs import StepGraphs
from kvchunks.engine.flash_attention import FlashAttention, flash_attn_available
from kvchunks.engine.flex_attention import KERNEL_BLOCK, FlexAttention, flex_usable
from kvchunks.engine.kv_segment import KVSegment
from kvchunks.engine.model import CausalLM, load_weights
from kvchunks.engine.rotary import cos_sin, inverse_frequencies
from kvchunks.engine.sequence import Sequence

DECODE_GROUP = 8


class ModelRunner:
    def __init__(self, folder: Path, model_config: ModelConfig, config: EngineConfig):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        with torch.device(self.device):
            self.model = CausalLM(model_config).to(config.torch_dtype)
        load_weights(self.model, folder)
        self.model.eval()
        self.model.prepare_for_decode()
        self.inv_freq = inverse_frequencies(model_config).to(self.device)
        self.num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // self.block_bytes())
        # On CUDA one block more, beyond the block manager's: graphs' padding rows
        # write their KV there.
        scratch = 1 if self.device.type == "cuda" else 0
        self.kv_cache = torch.zeros(
            2,
            model_config.num_layers,
            self.num_blocks + scratch,
            self.block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
            dtype=config.torch_dtype,
            device=self.device,
        )
        self.backend = self._backend()
        self.graphs = self._step_graphs()
        # Selective recompute needs an arbitrary visibility mask, which only torch's SDPA takes.
        self.masked_backend = TorchAttention(self.kv_cache)

    def _backend(self) -> TorchAttention:
        """`auto` is flex on CUDA (it reads the pool in place; flash-attn and torch gather
        every visible key per step) and torch on CPU, where flex runs eagerly."""
        choice, device = self.config.attention_backend, self.config.device
        if choice == "auto":
            on_cuda = self.device.type == "cuda" and flex_usable(device, self.block_size)
            choice = "flex" if on_cuda else "torch"
        if choice == "flash-attn":
            if not flash_attn_available(device, self.config.torch_dtype):
                raise InvalidInput(
                    "the flash-attn backend needs CUDA, float16/bfloat16 and `pip install "
                    "kvchunks[cuda]`; use attention_backend='torch' or 'auto'"
                )
            return FlashAttention(self.kv_cache)
        if choice == "torch":
            return TorchAttention(self.kv_cache)
        if not flex_usable(device, self.block_size):
            raise InvalidInput(
                f"the flex backend on CUDA needs a block_size that is a multiple of "
                f"{KERNEL_BLOCK}; use attention_backend='torch' or another block_size"
            )
        return FlexAttention(self.kv_cache, compiled=self.device.type == "cuda")

    def _step_graphs(self) -> StepGraphs | None:
        """CUDA graphs for decode steps and short prefills: on the flex backend, whose plan
        has fixed shapes once padded (the gather backends' keys do not)."""
        if self.config.enforce_eager or not isinstance(self.backend, FlexAttention):
            return None
        if self.device.type != "cuda":
            return None
        window = self.model_config.max_position_embeddings
        # One timeline starting mid-block, in a pool that has room for it.
        max_entries = min(window // self.block_size + 2, self.num_blocks)
        max_batch = min(self.config.max_num_seqs, 512)
        scratch_slot = self.num_blocks * self.block_size
        return StepGraphs(self.model, self.backend, max_batch, max_entries, scratch_slot)

    def block_bytes(self) -> int:
        return self.model_config.kv_bytes(self.block_size, self.config.torch_dtype)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Compute KV for every sequence's scheduled tokens and return logits.

        Logits are one row per sequence (its last token), or one row per new token when
        all_logits is set.
        """
        decode = (
            self.backend.padded_decode
            and not all_logits
            and all(seq.num_scheduled == 1 for seq in seqs)
        )
        # Decoding sequences are laid out by key count, so each padded group is a slice.
        order = range(len(seqs))
        if decode:
            order = sorted(order, key=lambda i: _num_keys(seqs[i]))
        ids, meta = self._step_inputs([seqs[i] for i in order])
        if decode:
            meta.decode = self._decode_groups(meta.sequences)
        hidden = None if self.graphs is None or all_logits else self.graphs.run(ids, meta)
        if hidden is None:
            hidden = self.model(ids, meta, self.backend)
        if not all_logits:
            last_rows = [0] * len(seqs)
            for i, attention in zip(order, meta.sequences, strict=True):
                last_rows[i] = attention.query_end - 1
            hidden = hidden[last_rows]  # one row per sequence, in the order given
        return self.model.logits(hidden)

    def _step_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionMetadata]:
        """The token ids of the sequences' new tokens, in this order, and their metadata.

        Every index is made in host memory, from runs of consecutive integers expanded for
        the whole batch at once, and crosses to the device in one copy: made there, each
        sequence's few small tensors would cost a kernel launch apiece."""
        bs = self.block_size
        input_ids, positions, slots, keys, key_counts, fresh = [], [], [], [], [], []
        for seq in seqs:
            first, last = seq.num_computed, seq.num_computed_after_step
            input_ids += seq.token_ids[first:last]
            positions.append((seq.position + first, last - first))
            own = KVSegment(tuple(seq.blocks), seq.start, last, 0)
            slots += own.sub(first, last - first, bs).slot_runs(bs)
            fresh.append(not seq.context and first == 0)
            if not fresh[-1]:
                keys += seq.context_slot_runs(bs) + own.slot_runs(bs)
                key_counts.append(_num_keys(seq))
        n = len(input_ids)
        host = torch.from_numpy(np.concatenate([input_ids, expand_runs(positions + slots + keys)]))
        ids, pos, slot_mapping, *moved_keys = host.to(self.device).split([n, n, n, *key_counts])
        _, _, new_slots, *host_keys = host.split([n, n, n, *key_counts])
        moved_keys, host_keys = iter(moved_keys), iter(host_keys)
        per_seq, offset = [], 0
        for seq, new in zip(seqs, fresh, strict=True):
            end = offset + seq.num_scheduled
            # A fresh sequence's keys are its new tokens'; the keys are wanted on both sides.
            if new:
                both = (slot_mapping[offset:end], new_slots[offset:end])
            else:
                both = (next(moved_keys), next(host_keys))
            per_seq.append(self._sequence_attention(seq, offset, end, new, *both))
            offset = end
        cos, sin = cos_sin(self.inv_freq, pos, self.config.torch_dtype)
        return ids, AttentionMetadata(slot_mapping, cos, sin, per_seq)

    @torch.inference_mode()
    def recompute(
        self,
        token_ids: list[int],
        positions: torch.Tensor,
        slots: torch.Tensor,
        key_slots: torch.Tensor,
        visible: torch.Tensor,
    ) -> None:
        """Compute the KV of some tokens of a stored run again, writing it over their slots.

        Token i sits at key index visible[i] of key_slots and sees the keys up to it. Each
        layer writes the new K/V before attending, so at every layer the chosen tokens see
        each other's recomputed KV and the other tokens' stored KV.
        """
        cos, sin = cos_sin(self.inv_freq, positions.to(self.device), self.config.torch_dtype)
        attention = SequenceAttention(0, len(token_ids), key_slots, fresh=False, visible=visible)
        meta = AttentionMetadata(slots, cos, sin, [attention])
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        self.model(ids, meta, self.masked_backend)

    def segment_slots(self, segment: KVSegment) -> torch.Tensor:
        """The flat pool slot of each of the segment's tokens, on the device."""
        return slots_of([segment], self.block_size).to(self.device)

    def _sequence_attention(
        self,
        seq: Sequence,
        q_start: int,
        q_end: int,
        fresh: bool,
        key_slots: torch.Tensor,
        host_key_slots: torch.Tensor,
    ) -> SequenceAttention:
        attention = SequenceAttention(
            q_start, q_end, key_slots, fresh, host_key_slots=host_key_slots
        )
        if any(s.shift for s in seq.context):
            # Every key's RoPE delta: its segment's shift, 0 for the sequence's own tokens.
            own = torch.zeros(seq.num_computed_after_step, dtype=torch.long)
            shifts = torch.cat([torch.full((s.length,), s.shift) for s in seq.context] + [own])
            attention.key_shifts = shifts
            attention.key_cos, attention.key_sin = cos_sin(
                self.inv_freq, shifts.to(self.device), self.config.torch_dtype
            )
        return attention

    def _decode_groups(self, per_seq: list[SequenceAttention]) -> list[DecodeBatch]:
        """Sequences (sorted by key count) padded in small groups: one kernel per group
        wastes far less on padding than one for the whole batch (measured fastest at ~8)."""
        return [
            self._decode_batch(per_seq[i : i + DECODE_GROUP], i)
            for i in range(0, len(per_seq), DECODE_GROUP)
        ]

    def _decode_batch(self, per_seq: list[SequenceAttention], first_row: int) -> DecodeBatch:
        key_slots = pad_sequence([s.key_slots for s in per_seq], batch_first=True)
        lengths = torch.tensor([s.key_slots.numel() for s in per_seq], device=self.device)
        valid = torch.arange(key_slots.shape[1], device=self.device)[None, :] < lengths[:, None]
        batch = DecodeBatch(
            slice(first_row, first_row + len(per_seq)), key_slots, valid[:, None, None, :]
        )
        if any(s.key_cos is not None for s in per_seq):
            no_cos, no_sin = cos_sin(
                self.inv_freq,
                torch.zeros(key_slots.shape[1], device=self.device),
                self.config.torch_dtype,
            )
            tables = [
                (s.key_cos, s.key_sin) if s.key_cos is not None else (no_cos, no_sin)
                for s in per_seq
            ]
            batch.key_cos = pad_sequence([c for c, _ in tables], batch_first=True)
            batch.key_sin = pad_sequence([s for _, s in tables], batch_first=True)
        return batch


def slots_of(segments: list[KVSegment], block_size: int) -> torch.Tensor:
    """The flat pool slot of each token of the segments, in order, in host memory."""
    runs = [run for segment in segments for run in segment.slot_runs(block_size)]
    return torch.from_numpy(expand_runs(runs))


def expand_runs(runs: list[tuple[int, int]]) -> np.ndarray:
    """The integers of (first, count) runs, one run after another: a few array operations
    however many runs (a range per run would cost an operation each)."""
    firsts, counts = np.array(runs, dtype=np.int64).reshape(-1, 2).T
    starts = counts.cumsum() - counts
    return np.repeat(firsts - starts, counts) + np.arange(counts.sum())


def _num_keys(seq: Sequence) -> int:
    """How many keys the sequence's last scheduled token attends to."""
    return sum(segment.length for segment in seq.context) + seq.num_computed_after_step
