"""The inference engine: model, paged KV pool, filtered attention, scheduler, sampler.

Names are imported on first use, so that a light module (`kvchunks.engine.checkpoint`, which
finds a checkpoint and reads its config.json) does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LLM": "kvchunks.engine.llm",
    "PrefillResult": "kvchunks.engine.llm",
    "RequestOutput": "kvchunks.engine.llm",
    "EngineConfig": "kvchunks.engine.config",
    "ModelConfig": "kvchunks.engine.config",
    "KVSegment": "kvchunks.engine.kv_segment",
    "SamplingParams": "kvchunks.engine.sampling_params",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvchunks.engine' has no attribute {name!r}")
