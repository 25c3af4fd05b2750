"""A worker's view of the cluster's tiers: where its store gets KV that is not in its own pool
(a HostStore, a peer's pool, another node's DiskStore), where KV it evicts goes (its node's
HostStore, through the TierManager), so that it outlives the worker, whether a new KV file fits
its node's disk budget, where an activation's prefetch runs, and what the other workers hold.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Iterator
from functools import partial

import ray
import torch

from kvchunks.actors.kv_transfer import KVPayload
from kvchunks.actors.remote import ServiceUnavailable, get
from kvchunks.service.kv_sources import KV
from kvchunks.service.node_memory import Spilled
from kvchunks.store.chunk import ChunkInfo

# The context whose routed call is running (None: a caller pinned to this worker); read in
# the background, where an activation's prefetch decides where to run (see `hand_over`).
ROUTED_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "routed_context", default=None
)


class SharedTiers:
    """A KV source (`load`), the node's memory (`spill`, `unspill`), a disk budget
    (`admit_file`), a prefetch hand-over (`hand_over`) and the shared pool's tiers
    (`pool_tiers`) for a worker's ChunkStore."""

    def __init__(
        self,
        registry: ray.actor.ActorHandle,
        tier_manager: ray.actor.ActorHandle,
        worker: str,
        node: str,
        spec: dict,  # the worker's fingerprint, dtype and KV shape
    ):
        self.registry, self.tier_manager = registry, tier_manager
        self.worker, self.node, self.spec = worker, node, spec
        self.stats: Counter[str] = Counter()  # shipped, spilled, prefetch_handed_over
        self.redirects: dict[str, str] = {}  # context -> where its last prefetch was handed
        self.tiers_seen: dict[str, str] | None = None  # pool_tiers, read once per call

    @contextlib.contextmanager
    def serving(self, routed_context: str | None) -> Iterator[None]:
        """Around one API call. Routed callers (`routed_context`: the call's context)
        activate through the worker they last used, without asking the router first: the
        prefetch an activation starts goes to the worker the router picks, and that worker
        is named in the reply to the next call (`redirect`). A caller pinned to this worker
        passes None: its activations prefetch here."""
        routing = ROUTED_CONTEXT.set(routed_context)
        self.tiers_seen = None
        try:
            yield
        finally:
            ROUTED_CONTEXT.reset(routing)

    def redirect(self, context: str) -> str | None:
        """The worker that `context`'s next calls should go to, if not this one; asked once."""
        return self.redirects.pop(context, None)

    def load(self, chunk: ChunkInfo) -> KV | None:
        """The chunk's KV shipped from elsewhere in the cluster (counted as `shipped`), or
        None: then the worker reads its file or recomputes."""
        request = self.tier_manager.fetch.remote(chunk.hash, self.worker, self.node, self.spec)
        try:
            ref = get(request, "KV fetch")
        except ServiceUnavailable:
            return None
        kv = self._received(ref, chunk) if ref is not None else None
        self.stats["shipped"] += kv is not None
        return kv

    def _received(self, ref: ray.ObjectRef, chunk: ChunkInfo) -> KV | None:
        """The KV behind `ref` if it is the chunk's, of this worker's model and dtype; None if
        not, or if its holder died meanwhile (the file or a recompute will do)."""
        try:
            payload = get(ref, "KV transfer")
        except ServiceUnavailable:
            return None
        layers, _, heads, dim = self.spec["shape"]
        expected = (layers, chunk.token_count, heads, dim)
        if payload is None or payload.shape != expected or payload.dtype != self.spec["dtype"]:
            return None
        return payload.tensors()

    def spill(self, chunk_hash: str, k: torch.Tensor, v: torch.Tensor) -> Spilled:
        """Hand KV leaving the worker's pool to the node's HostStore (see NodeMemory)."""
        payload = KVPayload.from_tensors(k, v)
        ref = ray.put(payload)
        try:  # the ref travels in a list so that the TierManager passes it on unread
            offload = self.tier_manager.offload.remote(chunk_hash, self.node, [ref], payload.nbytes)
            kept, dropped = get(offload, "KV offload")
        except ServiceUnavailable:
            return Spilled(False, {})
        self.stats["spilled"] += int(kept)
        return Spilled(kept, {h: partial(self._received, refs[0]) for h, refs in dropped.items()})

    def unspill(self, chunk_hash: str) -> None:
        """The chunk was archived to disk (its file checked): no node's HostStore keeps it."""
        with contextlib.suppress(ServiceUnavailable):  # then it stays there, as cpu
            get(self.tier_manager.drop_host.remote(chunk_hash), "KV archive")

    def admit_file(self, chunk_hash: str, nbytes: int) -> bool:
        """Whether a new KV file of `nbytes` fits the node's disk budget (then counted there)."""
        admit = self.tier_manager.admit_file.remote(chunk_hash, self.node, nbytes)
        return get(admit, "the disk budget")

    def hand_over(self, chunk: ChunkInfo, active: list[str]) -> list[str] | None:
        """For a routed call whose context's chunks are not all in this pool, have the
        TierManager run the prefetch policy and send the prefetch to the worker the router
        picks. Returns what to bring in here (none: another worker took it), or None: the
        store's own policy prefetches here (a pinned call, or no TierManager). Asking the
        TierManager for every activation cost a quarter of the service's throughput under
        load (bench/soak.py), so the store asks only when something is missing."""
        context = ROUTED_CONTEXT.get()
        if context is None:
            return None
        request = self.tier_manager.prefetch.remote(self.worker, chunk, active)
        try:
            target, wanted = get(request, "the tier manager")
        except ServiceUnavailable:
            return None
        if target == self.worker:
            return wanted
        self.redirects[context] = target
        self.stats["prefetch_handed_over"] += 1
        return []

    def pool_tiers(self) -> dict[str, str]:
        """The shared pool's tiers (the other workers' pools and host memory, then the
        HostStores), read once per call (describe asks for every chunk it shows)."""
        if self.tiers_seen is None:
            held = self.registry.pool_tiers.remote(self.worker)
            in_host = self.tier_manager.in_host.remote()
            held, in_host = get([held, in_host], "the pool's tiers")
            self.tiers_seen = dict.fromkeys(in_host, "cpu") | held
        return self.tiers_seen
