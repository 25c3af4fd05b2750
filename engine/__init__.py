"""The inference engine: model, paged KV pool, filtered attention, scheduler, sampler."""

from kvchunks.engine.config import EngineConfig, ModelConfig
from kvchunks.engine.kv_segment import KVSegment
from kvchunks.engine.llm import LLM, PrefillResult, RequestOutput
from kvchunks.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "EngineConfig",
    "KVSegment",
    "ModelConfig",
    "PrefillResult",
    "RequestOutput",
    "SamplingParams",
]
