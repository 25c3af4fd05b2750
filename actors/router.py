"""Router: which worker serves a context's next request.

Shipping KV costs time and a recompute costs much more, so a request goes to the worker that
already holds most of the bytes of its context's active chunks; among equals, to the one with
the most free KV blocks; then to the first. Whatever the chosen worker lacks, it ships.
"""

from __future__ import annotations

import ray

from kvchunks.actors.remote import get


class Router:
    def __init__(self, registry: ray.actor.ActorHandle, pinned: str | None = None):
        self.registry = registry
        self.pinned = pinned  # always this worker (tests, benchmarks, data locality by hand)

    def pick(self, context: str, adding: str | None = None) -> str:
        """The worker for `context` (counting the chunk `adding`, about to be activated)."""
        if self.pinned is not None:
            return self.pinned
        return _best(get(self.registry.placement.remote(context, adding), "the registry"))

    def holder(self, ref: str) -> str | None:
        """The worker holding most of the KV of the chunk `ref` names; None if none does."""
        if self.pinned is not None:
            return self.pinned
        placement = get(self.registry.placement.remote(None, ref), "the registry")
        return _best(placement) if any(placement["held"].values()) else None

    def pick_for(self, hashes: list[str]) -> str:
        """The worker for a request that reads these chunks."""
        if self.pinned is not None:
            return self.pinned
        return _best(get(self.registry.placement_of.remote(hashes), "the registry"))


def _best(placement: dict) -> str:
    return choose(placement["workers"], placement["held"], placement["free"])


def choose(workers: list[str], held: dict[str, int], free: dict[str, int]) -> str:
    """The worker holding most bytes, then with most free blocks, then the first listed."""
    order = {w: i for i, w in enumerate(workers)}
    return max(workers, key=lambda w: (held.get(w, 0), free.get(w, 0), -order[w]))
