"""kvchunks: a KV-cache context manager for LLM inference.

Imports are lazy so that `kvchunks.store` and the CLI's help do not pay for torch.
"""

from __future__ import annotations

import importlib

from kvchunks.common import (
    AmbiguousHash,
    CapacityError,
    ChunkFileError,
    ChunkInUse,
    ChunkNotFound,
    ConcurrentChange,
    ContextWindowExceeded,
    DtypeMismatch,
    InvalidInput,
    KVChunksError,
    RegistryUnavailable,
    ServiceUnavailable,
    WorkerDied,
)

_LAZY = {
    "ContextManager": "kvchunks.service.context_manager",
    # The registry-only part of the API (listing, lookup, tags, activation, settings),
    # opened without the engine's imports: the command line's quick commands use it.
    "Catalog": "kvchunks.service.catalog",
    "open_catalog": "kvchunks.service.catalog",
    "GenerationResult": "kvchunks.service.generation",
    "ContextView": "kvchunks.service.context_settings",
    "ChunkInfo": "kvchunks.store.chunk",
    # The provenance tree of listed chunks, drawn by the command line and the web page.
    "provenance_tree": "kvchunks.service.provenance",
    "ProvenanceTree": "kvchunks.service.provenance",
    "TreeNode": "kvchunks.service.provenance",
    "SamplingParams": "kvchunks.engine.sampling_params",
    "EngineConfig": "kvchunks.engine.config",
    "connect": "kvchunks.actors.client",
    "Client": "kvchunks.actors.client",
    # The default model's set-up, for the command line (`kvchunks model prepare`).
    "resolve_model": "kvchunks.engine.checkpoint",
    "prepare_default_model": "kvchunks.engine.checkpoint",
}

__all__ = [
    "AmbiguousHash",
    "CapacityError",
    "ChunkFileError",
    "ChunkInUse",
    "ChunkNotFound",
    "ConcurrentChange",
    "ContextWindowExceeded",
    "DtypeMismatch",
    "InvalidInput",
    "KVChunksError",
    "RegistryUnavailable",
    "ServiceUnavailable",
    "WorkerDied",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvchunks' has no attribute {name!r}")
