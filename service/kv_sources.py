"""Where a chunk's KV comes from when it is not in the pool or this process's host memory:
KV sources tried in order (a peer's copy, then the chunk's file), one load per chunk at a
time, so that a generation needing a chunk that a prefetch is loading waits for that load
instead of reading the file again. None from every source means: recompute it."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future
from typing import Protocol

import torch

from kvchunks.store.chunk import ChunkInfo

KV = tuple[torch.Tensor, torch.Tensor]


class KVSource(Protocol):
    def load(self, chunk: ChunkInfo) -> KV | None:
        """The chunk's KV ([layers, tokens, kv_heads, head_dim] each), or None."""
        ...


class KVLoader:
    def __init__(self, sources: list[KVSource], stats: Counter[str]):
        self.sources, self.stats = sources, stats
        self._loading: dict[str, Future] = {}  # hash -> its KV, once loaded
        self._lock = threading.Lock()

    def load(self, chunk: ChunkInfo, keep: bool = False) -> KV | None:
        """The chunk's KV from the first source that has it. Takes no other lock.

        With `keep`, the loaded KV stays on offer to other callers until `release`: a
        caller that installs it later (a prefetch waits for the pool's lock) keeps others
        from loading it again meanwhile."""
        with self._lock:
            pending = self._loading.get(chunk.hash)
            if pending is None:
                self._loading[chunk.hash] = mine = Future()
        if pending is not None:  # a prefetch (or another call) is loading it: late for us
            self.stats["load_waits"] += 1
            return pending.result()
        try:
            kv = next((kv for s in self.sources if (kv := s.load(chunk)) is not None), None)
        except BaseException as e:  # those waiting for this load get its error too
            self.release(chunk.hash)
            mine.set_exception(e)
            raise
        if not keep:
            self.release(chunk.hash)
        mine.set_result(kv)
        return kv

    def release(self, chunk_hash: str) -> None:
        with self._lock:
            self._loading.pop(chunk_hash, None)
