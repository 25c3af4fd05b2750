"""A worker's view of the cluster's tiers: where its store gets KV that is not in its own pool
(a HostStore, a peer's pool, another node's DiskStore), where KV it evicts goes (its node's
HostStore, through the TierManager), so that it outlives the worker, and whether a new KV
file fits its node's disk budget."""

from __future__ import annotations

from collections import Counter

import ray
import torch

from kvchunks.actors.kv_transfer import KVPayload
from kvchunks.actors.remote import ServiceUnavailable, get
from kvchunks.store.chunk import ChunkInfo


class SharedTiers:
    """A KV source (`load`), a spill target (`spill`) and a disk budget (`admit_file`) for a
    worker's ChunkStore."""

    def __init__(
        self,
        tier_manager: ray.actor.ActorHandle,
        worker: str,
        node: str,
        spec: dict,  # the worker's fingerprint, dtype and KV shape (InferenceWorker.spec)
    ):
        self.tier_manager, self.worker, self.node, self.spec = tier_manager, worker, node, spec
        self.stats: Counter[str] = Counter()  # shipped, spilled

    def load(self, chunk: ChunkInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's KV shipped from elsewhere in the cluster (counted as `shipped`), or
        None: then the worker reads its file or recomputes."""
        request = self.tier_manager.fetch.remote(chunk.hash, self.worker, self.node, self.spec)
        try:
            ref = get(request, "KV fetch")
            payload = get(ref, "KV transfer") if ref is not None else None
        except ServiceUnavailable:  # the peer died meanwhile: the file or a recompute will do
            return None
        layers, _, heads, dim = self.spec["shape"]
        expected = (layers, chunk.token_count, heads, dim)
        if payload is None or payload.shape != expected or payload.dtype != self.spec["dtype"]:
            return None
        self.stats["shipped"] += 1
        return payload.tensors()

    def spill(self, chunk_hash: str, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Hand KV leaving the worker's pool to the node's HostStore; True once it is there."""
        payload = KVPayload.from_tensors(k, v)
        ref = ray.put(payload)
        try:  # the ref travels in a list so that the TierManager passes it on unread
            offload = self.tier_manager.offload.remote(chunk_hash, self.node, [ref], payload.nbytes)
            kept = get(offload, "KV offload")
        except ServiceUnavailable:
            return False
        self.stats["spilled"] += int(kept)
        return kept

    def admit_file(self, chunk_hash: str, nbytes: int) -> bool:
        """Whether a new KV file of `nbytes` fits the node's disk budget (then counted there)."""
        admit = self.tier_manager.admit_file.remote(chunk_hash, self.node, nbytes)
        return get(admit, "the disk budget")
