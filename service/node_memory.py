"""A node's shared host memory (in a cluster: its HostStore, budgeted by the TierManager):
where KV leaving a worker's pool goes instead of the worker's own host memory, so that it
outlives the worker. The tiers use it when they are given one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from kvchunks.service.kv_sources import KV
from kvchunks.store.chunk import ChunkInfo


@dataclass
class Spilled:
    kept: bool  # the KV is in the node's memory now
    # The chunks it let go of to make room that no worker's pool holds, each with a way to
    # read the copy it held (None: not that chunk's): their files are checked, and written
    # again from it if damaged.
    dropped: dict[str, Callable[[ChunkInfo], KV | None]]


class NodeMemory(Protocol):
    def spill(self, chunk_hash: str, k: torch.Tensor, v: torch.Tensor) -> Spilled:
        """Hand KV leaving the pool to the node's memory."""
        ...

    def unspill(self, chunk_hash: str) -> None:
        """The chunk was archived to disk, its file checked: the node's memory lets it go."""
        ...
