"""Model and engine settings, read from a Hugging Face checkpoint folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvchunks.common import InvalidInput
from kvchunks.engine.checkpoint import context_window, read_config
from kvchunks.vocabulary import DEFAULT_DTYPE, DTYPES

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # on q, k and v
    output_bias: bool  # on the attention's output projection
    mlp_bias: bool
    qk_norm: bool
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise InvalidInput(f"unsupported architecture {arch}; supported: {supported}")
        family = SUPPORTED_ARCHITECTURES[arch]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=context_window(cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", family == "qwen2"),
            # Qwen2 puts biases on q, k and v only; Llama's and Qwen3's attention_bias covers
            # the output projection too.
            output_bias=family != "qwen2" and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            qk_norm=family == "qwen3",
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    def kv_bytes(self, tokens: int, dtype: torch.dtype) -> int:
        """Bytes of K and V for `tokens` tokens in every layer."""
        return 2 * self.num_layers * tokens * self.num_kv_heads * self.head_dim * dtype.itemsize

    @classmethod
    def from_folder(cls, path: Path) -> ModelConfig:
        return cls.from_dict(read_config(path))


@dataclass
class EngineConfig:
    """How the engine runs: KV pool size, batching limits, dtype, device, attention backend."""

    block_size: int = 256
    kv_cache_bytes: int = 1 << 30
    num_blocks: int | None = None
    max_num_seqs: int = 64
    # New tokens one step computes at most: a longer prompt is computed in pieces, and
    # running answers wait for their next token no longer than a step of this size takes.
    # None: 2048 on CUDA, 512 on CPU, where a 2048-token step takes seconds.
    max_num_batched_tokens: int | None = None
    dtype: str = DEFAULT_DTYPE
    device: str | None = None
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs (they need CUDA and flex)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise InvalidInput(f"block_size must be >= 1, got {self.block_size}")
        if self.dtype not in DTYPES:
            raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        if self.attention_backend not in ("auto", "torch", "flex", "flash-attn"):
            raise InvalidInput(f"unknown attention backend {self.attention_backend!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 2048 if self.device.startswith("cuda") else 512
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidInput(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}): every running answer's next token goes "
                "in each step"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
