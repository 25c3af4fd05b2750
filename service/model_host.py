"""The model a store serves: what is known of it before its engine starts (config, tokenizer,
chat framing, fingerprint), and the engine itself, started on first use.

Listing, tagging or activating chunks needs only the registry and these; loading 0.5 GB of
weights and allocating the KV pool waits for the first call that computes or moves KV.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

from kvchunks.engine import LLM, EngineConfig, ModelConfig
from kvchunks.engine.chat import ChatFormat
from kvchunks.engine.checkpoint import resolve_model
from kvchunks.store.chunk import ChunkRecord, check_dtype
from kvchunks.store.hashing import model_fingerprint, weights_digest

_DIGESTS: dict[str, str] = {}  # weights digest by file stamp: hashing 0.5 GB once is enough


class ModelHost:
    def __init__(
        self,
        model: str | Path | None,
        home: Path,
        engine_config: EngineConfig | None = None,
        llm: LLM | None = None,
    ):
        self._llm = llm
        self.path = llm.path if llm else resolve_model(model)
        self.engine_config = llm.config if llm else (engine_config or EngineConfig())
        self.model_config = ModelConfig.from_folder(self.path)
        self.tokenizer = llm.tokenizer if llm else AutoTokenizer.from_pretrained(self.path)
        self.chat = ChatFormat(self.tokenizer)
        self.block_size = self.engine_config.block_size
        self.fingerprint = _fingerprint(
            self.path, home, self.model_config, self.engine_config, self.chat.opening
        )
        # One lock for the engine's pool and everything that moves KV in or out of it
        # (background prefetches write between engine steps, never during one). The engine
        # starts under it too: its start hooks bring KV into the pool.
        self.lock = threading.RLock()
        self._on_start: list[Callable[[], None]] = []

    def on_start(self, hook: Callable[[], None]) -> None:
        """Run `hook` right after the engine starts (now, if it has)."""
        if self.started:
            hook()
        else:
            self._on_start.append(hook)

    @property
    def llm(self) -> LLM:
        """The engine, started on first use."""
        if self._llm is None:
            with self.lock:
                if self._llm is None:
                    llm = LLM(self.path, self.engine_config)
                    self._llm = llm
                    for hook in self._on_start:
                        hook()
        return self._llm

    @property
    def started(self) -> bool:
        return self._llm is not None

    @property
    def window(self) -> int:
        return self.model_config.max_position_embeddings

    @property
    def pinned_memory(self) -> bool:
        """Whether host copies of KV should be pinned (for transfers to an accelerator)."""
        return torch.device(self.engine_config.device).type == "cuda"

    def check_dtype(self, chunks: list[ChunkRecord]) -> None:
        """Refuse chunks computed in another dtype than this model's."""
        check_dtype(chunks, self.engine_config.dtype)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def kv_bytes(self, tokens: int) -> int:
        return self.model_config.kv_bytes(tokens, self.engine_config.torch_dtype)

    def kv_shape(self) -> tuple:
        """The shape of a chunk's K (or V), [layers, tokens, kv_heads, head_dim], with None
        for its number of tokens."""
        c = self.model_config
        return (c.num_layers, None, c.num_kv_heads, c.head_dim)


def _fingerprint(
    path: Path, home: Path, model: ModelConfig, engine: EngineConfig, opening: list[int]
) -> str:
    files = sorted(path.glob("*.safetensors"))
    stamp = ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    if stamp not in _DIGESTS:
        cache = home / "fingerprints.json"
        known = json.loads(cache.read_text()) if cache.exists() else {}
        if stamp not in known:
            known[stamp] = weights_digest(files)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
        _DIGESTS[stamp] = known[stamp]
    digest = _DIGESTS[stamp]
    return model_fingerprint(model.architecture, digest, engine.dtype, engine.block_size, opening)
