"""A store's lease in the registry: renewed while its process lives, so that what the calls
of a process killed mid-call held is let go by a store that is still alive."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kvchunks.store.registry import ChunkRegistry

log = logging.getLogger(__name__)

# Long enough that a process busy for many seconds keeps it (its renewing thread waits for
# no lock); a killed process's holds are let go within this and a renewal of another store.
LEASE_SECONDS = 30.0


class StoreLease:
    """Renews the store's lease every third of its length. After a renewal, once the lease
    has been held for a whole length without a gap, runs `on_renew` (the store lets go of
    what lapsed stores' calls held): by then every live store has renewed its own, even
    after the registry was away and all leases ran out. `on_renew` runs in a thread of its
    own, one at a time: it may wait for the store's lock, which a long load holds, and the
    lease must not wait with it. The lease exists once this is made, before any call of the
    store holds a chunk."""

    def __init__(
        self,
        registry: ChunkRegistry,
        name: str,
        on_renew: Callable[[], None],
        seconds: float | None = None,  # None: LEASE_SECONDS
        clock: Callable[[], float] = time.monotonic,
    ):
        seconds = LEASE_SECONDS if seconds is None else seconds
        self.registry, self.name, self.seconds = registry, name, seconds
        self.on_renew, self.clock = on_renew, clock
        registry.renew_lease(name, seconds)
        self._held_since: float | None = clock()  # None: the last renewal failed
        self.sweep: threading.Thread | None = None  # the last on_renew's
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.wait(self.seconds / 3):
            self.renew()

    def renew(self) -> None:
        """One round: renew the lease, then start `on_renew` if it is time (see the class)."""
        now = self.clock()
        try:
            unbroken = self.registry.renew_lease(self.name, self.seconds)
        except Exception as e:  # the registry away for a while: the next round tries again
            log.warning("could not renew the lease of store %s: %s", self.name, e)
            self._held_since = None
            return
        if not unbroken or self._held_since is None:
            self._held_since = now
        if now - self._held_since >= self.seconds and not (self.sweep and self.sweep.is_alive()):
            self.sweep = threading.Thread(target=self._run_on_renew, daemon=True)
            self.sweep.start()

    def _run_on_renew(self) -> None:
        try:
            self.on_renew()
        except Exception as e:
            log.warning("could not let go of what dead calls held: %s", e)

    def close(self) -> None:
        """Stop renewing, wait for a round under way, and end the lease."""
        self._closed.set()
        self._thread.join()
        if self.sweep is not None:
            self.sweep.join()
        self.registry.end_lease(self.name)
