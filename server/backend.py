"""What the HTTP server serves: the in-process API over one chunk store, or the Ray cluster
through the Client. Both hand out one API object per context with the same methods."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, Protocol


class Backend(Protocol):
    model_name: str

    def manager(self, context: str) -> Any:
        """The API (ContextManager or Client) of one context."""
        ...

    def made(self, context: str) -> Any | None:
        """`manager(context)` if it has been made: a lookup that never blocks."""
        ...

    def let_go(self, context: str) -> None:
        """Drop the context's API object, if one is kept (its context was deleted)."""
        ...

    def usage(self) -> dict:
        """{"stats", "pool", "host_bytes", "disk_bytes"} for the metrics, and the tiers'
        budgets ("host_budget", "disk_budget": bytes, or None when unknown or unlimited)."""
        ...

    def contexts(self) -> list[str]:
        """The names of the contexts that have ever had a chunk active or a setting."""
        ...


class _OnePerContext:
    """One API object per context, made on first use by the root's `with_context` and kept
    while it is among the KEPT most recently used: a server with a context per user would
    otherwise keep one for every name ever sent. The registry holds each context's state;
    an object holds only what a request does not need (the last generation's figures,
    output trackers, and for a Client the worker where the context's KV gathers)."""

    KEPT = 256

    def __init__(self, root):  # a ContextManager or a Client
        self.root = root
        self._managers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def made(self, context: str):
        """The context's API object if `manager` has made it (None: it may have to ask Ray)."""
        if context == self.root.context_name:
            return self.root
        manager = self._managers.get(context)
        with contextlib.suppress(KeyError):  # let go meanwhile: made again when next asked
            self._managers.move_to_end(context)  # without the lock, which a Ray call may hold
        return manager

    def manager(self, context: str):
        if context == self.root.context_name:
            return self.root
        with self._lock:
            if context in self._managers:
                self._managers.move_to_end(context)
            else:
                self._managers[context] = self.root.with_context(context)
                if len(self._managers) > self.KEPT:
                    self._managers.popitem(last=False)
            return self._managers[context]

    def let_go(self, context: str) -> None:
        with self._lock:
            self._managers.pop(context, None)


class LocalBackend(_OnePerContext):
    """ContextManagers over one ChunkStore in this process."""

    def __init__(self, manager):  # a ContextManager; its store is shared by every context
        super().__init__(manager)
        self.store = manager.store
        self.model_name = self.store.model.path.name

    def usage(self) -> dict:
        store = self.store
        pool = store.model.llm.pool_usage() if store.model.started else None
        return {
            "stats": dict(store.stats),
            "pool": pool,
            "host_bytes": store.host.used_bytes,
            "disk_bytes": store.files.used_bytes(),
            "host_budget": store.budgets.cpu_bytes,
            "disk_budget": store.budgets.disk_bytes,
        }

    def contexts(self) -> list[str]:
        return self.root.registry.contexts()


class ClusterBackend(_OnePerContext):
    """Clients of the kvchunks service on a Ray cluster."""

    def __init__(self, client):  # a kvchunks Client
        super().__init__(client)
        self.model_name = "kvchunks"

    def usage(self) -> dict:
        from kvchunks.actors import service

        report = service.status(service.attach())
        stats: dict[str, int] = {}
        for worker in report["workers"]:
            for name, value in worker.get("stats", {}).items():
                stats[name] = stats.get(name, 0) + value
        up = [w for w in report["workers"] if "blocks_total" in w]
        return {
            "stats": stats,
            "pool": {
                "blocks": sum(w["blocks_total"] for w in up),
                "free": sum(w["blocks_free"] for w in up),
            },
            "host_bytes": report["tiers"]["cpu"].get("bytes", 0),
            "disk_bytes": report["tiers"]["disk"].get("bytes", 0),
            "host_budget": None,  # each worker and the HostStore have budgets of their own
            "disk_budget": None,
        }

    def contexts(self) -> list[str]:
        from kvchunks.actors import service

        registry = service.attach().registry
        return service.get(registry.call.remote("contexts"), "the registry")
