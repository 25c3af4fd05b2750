"""kvchunks: a KV-cache context manager for LLM inference."""

from kvchunks.common import (
    AmbiguousHash,
    CapacityError,
    ChunkFileError,
    ChunkInUse,
    ChunkNotFound,
    ContextWindowExceeded,
    InvalidInput,
    KVChunksError,
    RegistryUnavailable,
)
from kvchunks.engine.sampling_params import SamplingParams

__all__ = [
    "AmbiguousHash",
    "CapacityError",
    "ChunkFileError",
    "ChunkInUse",
    "ChunkNotFound",
    "ContextWindowExceeded",
    "InvalidInput",
    "KVChunksError",
    "RegistryUnavailable",
    "SamplingParams",
]
