"""Decoder-only transformer for the Llama family (Llama 2/3, SmolLM2, Mistral), Qwen2 (QKV
bias) and Qwen3 (q/k norm). Projections are fused (qkv, gate_up) for fewer matmuls."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from kvchunks.common import InvalidInput
from kvchunks.engine.attention import AttentionBackend, AttentionMetadata
from kvchunks.engine.config import ModelConfig
from kvchunks.engine.rotary import rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.output_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, meta: AttentionMetadata, backend: AttentionBackend
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, meta.cos, meta.sin), rotate(k, meta.cos, meta.sin)
        out = backend.forward(self.layer, q, k, v, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, meta: AttentionMetadata, backend: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class _LayerCallbacks(threading.local):
    """Per thread: the callbacks its forward passes call after each decoder layer."""

    def __init__(self):
        self.callbacks: list[Callable[[int, int], None]] = []


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.lm_head_t: torch.Tensor | None = None
        self._watching = _LayerCallbacks()  # each thread's layer_progress callbacks

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, backend: AttentionBackend
    ) -> torch.Tensor:
        """Hidden states [N, hidden] for a flat batch of tokens."""
        x = self.embed_tokens(input_ids)
        watchers = self._watching.callbacks
        for done, layer in enumerate(self.layers, 1):
            x = layer(x, meta, backend)
            for on_layer in watchers:
                on_layer(done, len(self.layers))
        return self.norm(x)

    @contextlib.contextmanager
    def layer_progress(self, on_layer: Callable[[int, int], None]) -> Iterator[None]:
        """Within the block, `on_layer(done, layers)` after each decoder layer of the forward
        passes this thread runs: how far one long prefill, a single pass, has gone (or a
        check between layers, which may raise to stop the pass). Other threads' passes are
        not counted. (On CUDA a layer counts once its kernels are queued.)"""
        callbacks = self._watching.callbacks
        callbacks.append(on_layer)
        try:
            yield
        finally:
            callbacks.remove(on_layer)

    @contextlib.contextmanager
    def unwatched(self) -> Iterator[None]:
        """No layer_progress callback of this thread runs within the block: a CUDA graph's
        capture, which a callback raising would cut in the middle."""
        callbacks = self._watching.callbacks
        saved = callbacks[:]
        callbacks.clear()
        try:
            yield
        finally:
            callbacks[:] = saved

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if len(hidden) <= 4 and self.lm_head_t is not None:
            return (hidden @ self.lm_head_t).float()
        return self.lm_head(hidden).float()

    def prepare_for_decode(self) -> None:
        """On CPU in float32, keep a transposed copy of the vocabulary projection: for a
        handful of rows (decode) reading it row-major is about twice as fast, and it is the
        largest matmul. Not in bfloat16 or float16: on a CPU without instructions for them,
        that copy took the slow generic matmul, 35x slower than the plain projection."""
        weight = self.lm_head.weight
        fast = weight.device.type == "cpu" and weight.dtype == torch.float32
        self.lm_head_t = weight.t().contiguous() if fast else None


# Checkpoint names that land in a slice of one of our fused weights: (fused name, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def load_weights(model: CausalLM, folder: Path) -> None:
    """Copy a Hugging Face checkpoint's safetensors weights into the model's fused layout."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"no *.safetensors weights in {folder}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name)
                target = _copy_weight(model, params, name.removeprefix("model."), tensor)
                if target:
                    loaded.add(target)
    missing = {n for n in params if n not in loaded}
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise InvalidInput(f"checkpoint {folder} lacks weights: {', '.join(sorted(missing)[:5])}")


def _copy_weight(model: CausalLM, params: dict, name: str, tensor: torch.Tensor) -> str | None:
    for part, (fused, shard) in _FUSED.items():
        if f".{part}." in name:
            target = name.replace(part, fused)
            _copy_shard(model, params[target], part, shard, tensor)
            return target
    if name not in params:
        return None  # e.g. rotary caches some checkpoints carry
    with torch.no_grad():
        params[name].copy_(tensor)
    return name


def _copy_shard(model: CausalLM, param: nn.Parameter, part: str, shard: int, w: torch.Tensor):
    cfg = model.config
    if part in ("gate_proj", "up_proj"):
        sizes = [cfg.intermediate_size] * 2
    else:
        sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    offset = sum(sizes[:shard])
    with torch.no_grad():
        param.narrow(0, offset, sizes[shard]).copy_(w)
