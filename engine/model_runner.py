"""Holds the model and the KV pool; turns a batch of sequences into one forward pass."""

from __future__ import annotations

from pathlib import Path

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
from kvchunks.engine.cuda_graphs import DecodeGraphs
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
        # On CUDA one block more, beyond the block manager's: decode graphs' padding rows
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
        self.graphs = self._decode_graphs()
        # Selective recompute needs an arbitrary visibility mask, which only torch's SDPA takes.
        self.masked_backend = TorchAttention(self.kv_cache)

    def _backend(self) -> TorchAttention:
        choice = self.config.attention_backend
        usable = flash_attn_available(self.config.device, self.config.torch_dtype)
        if choice == "flash-attn" and not usable:
            raise InvalidInput(
                "the flash-attn backend needs CUDA, float16/bfloat16 and `pip install "
                "kvchunks[cuda]`; use attention_backend='torch' or 'auto'"
            )
        if choice in ("auto", "flash-attn") and usable:
            return FlashAttention(self.kv_cache)
        # `auto` does not take flex: its compiled kernels and decode graphs have not yet run
        # on a GPU, so it is asked for by name until they have.
        if choice != "flex":
            return TorchAttention(self.kv_cache)
        if not flex_usable(self.config.device, self.block_size):
            raise InvalidInput(
                f"the flex backend on CUDA needs a block_size that is a multiple of "
                f"{KERNEL_BLOCK}; use attention_backend='torch' or another block_size"
            )
        return FlexAttention(self.kv_cache, compiled=self.device.type == "cuda")

    def _decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs for decode steps: on the flex backend, whose plan has fixed shapes once
        padded (the gather backends' keys do not)."""
        if self.config.enforce_eager or not isinstance(self.backend, FlexAttention):
            return None
        if self.device.type != "cuda":
            return None
        window = self.model_config.max_position_embeddings
        # One timeline starting mid-block, in a pool that has room for it.
        max_entries = min(window // self.block_size + 2, self.num_blocks)
        max_batch = min(self.config.max_num_seqs, 512)
        scratch_slot = self.num_blocks * self.block_size
        return DecodeGraphs(self.model, self.backend, max_batch, max_entries, scratch_slot)

    def block_bytes(self) -> int:
        return self.model_config.kv_bytes(self.block_size, self.config.torch_dtype)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Compute KV for every sequence's not-yet-computed tokens and return logits.

        Logits are one row per sequence (its last token), or one row per new token when
        all_logits is set.
        """
        decode = (
            self.backend.padded_decode
            and not all_logits
            and all(seq.num_tokens - seq.num_computed == 1 for seq in seqs)
        )
        # Decoding sequences are laid out by key count, so each padded group is a slice.
        order = range(len(seqs))
        if decode:
            order = sorted(order, key=lambda i: _num_keys(seqs[i]))
        input_ids, positions, slots, per_seq = [], [], [], []
        last_rows, offset = [0] * len(seqs), 0
        for i in order:
            seq = seqs[i]
            first, last = seq.num_computed, seq.num_tokens
            input_ids += seq.token_ids[first:last]
            positions.append(torch.arange(seq.position + first, seq.position + last))
            own = self._own_slots(seq, last)
            slots.append(own[first:])
            per_seq.append(self._sequence_attention(seq, own, offset, offset + last - first))
            offset += last - first
            last_rows[i] = offset - 1
        pos = torch.cat(positions).to(self.device)
        cos, sin = cos_sin(self.inv_freq, pos, self.config.torch_dtype)
        meta = AttentionMetadata(torch.cat(slots), cos, sin, per_seq)
        if decode:
            meta.decode = self._decode_groups(per_seq)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        hidden = None if self.graphs is None or all_logits else self.graphs.run(ids, meta)
        if hidden is None:
            hidden = self.model(ids, meta, self.backend)
        if not all_logits:
            hidden = hidden[last_rows]  # one row per sequence, in the order given
        return self.model.logits(hidden)

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

    def _own_slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        return self.segment_slots(KVSegment(tuple(seq.blocks), seq.start, num_tokens, 0))

    def segment_slots(self, segment: KVSegment) -> torch.Tensor:
        """The flat pool slot of each of the segment's tokens."""
        index = torch.arange(segment.start, segment.end_slot(), device=self.device)
        blocks = torch.tensor(segment.blocks, dtype=torch.long, device=self.device)
        return blocks[index // self.block_size] * self.block_size + index % self.block_size

    def _sequence_attention(
        self, seq: Sequence, own: torch.Tensor, q_start: int, q_end: int
    ) -> SequenceAttention:
        if not seq.context and seq.num_computed == 0:
            return SequenceAttention(q_start, q_end, own, fresh=True)
        key_slots = torch.cat([*(self.segment_slots(s) for s in seq.context), own])
        attention = SequenceAttention(q_start, q_end, key_slots, fresh=False)
        if any(s.shift for s in seq.context):
            attention.key_cos, attention.key_sin = self._key_rotation(seq, own.numel())
        return attention

    def _key_rotation(self, seq: Sequence, num_own: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE delta tables for every key of seq: its segments' shifts, 0 for its own tokens."""
        shifts = [torch.full((s.length,), s.shift) for s in seq.context] + [torch.zeros(num_own)]
        return cos_sin(self.inv_freq, torch.cat(shifts).to(self.device), self.config.torch_dtype)

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


def _num_keys(seq: Sequence) -> int:
    """How many keys the sequence's next token attends to."""
    return sum(segment.length for segment in seq.context) + seq.num_tokens
