"""Chunks' tiers, written to the registry behind the moves that change them.

A tier record says where a chunk's KV was, so that a restart can bring the same chunks back
into the pool and host memory. The KV itself is always safe in its file, so a move does not
wait for Redis to make its record durable. Records are written in order on one thread, at
most `delay_s` after they are made: the records of a burst of moves (an eviction, a restore)
share one write and one fsync, and a chunk's latest tier replaces one not yet written.
`flush` writes them all at once.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from kvchunks.common import InvalidInput, KVChunksError
from kvchunks.store.registry import ChunkRegistry
from kvchunks.vocabulary import TIERS

log = logging.getLogger(__name__)


class TierRecords:
    def __init__(self, registry: ChunkRegistry, delay_s: float = 0.1):
        self._registry = registry
        self.delay_s = delay_s
        self._pending: dict[str, str] = {}  # hash -> tier, not yet written
        self._latest: dict[str, str] = {}  # hash -> the last tier recorded by this process
        self._closed = False
        self._queued = False  # a write is queued that will take the pending records along
        self._now = threading.Event()  # a flush is waiting: write without delay
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvchunks-tiers")

    def record(self, chunk_hash: str, tier: str) -> None:
        if tier not in TIERS:  # refused here: a bad record would block the ones behind it
            raise InvalidInput(f"unknown tier {tier!r}; use one of {', '.join(TIERS)}")
        with self._lock:
            self._pending[chunk_hash] = self._latest[chunk_hash] = tier
            queued, self._queued = self._queued, True
        if self._closed:  # written at once: nothing runs behind a closed store
            self._write()
        elif not queued:
            self._writer.submit(self._write_soon)

    def latest(self, chunk_hash: str) -> str | None:
        """The tier this process last recorded for the chunk, written yet or not."""
        return self._latest.get(chunk_hash)

    def forget(self, chunk_hash: str) -> None:
        """The chunk was deleted: its records not yet written are void, and a chunk made
        again with its hash starts with no tier here."""
        with self._lock:
            self._pending.pop(chunk_hash, None)
            self._latest.pop(chunk_hash, None)

    def flush(self) -> None:
        """Return once every record made so far is in the registry (or failed, logged)."""
        if self._closed:
            self._write()
            return
        self._now.set()
        try:
            self._writer.submit(self._write).result()
        finally:
            self._now.clear()

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._writer.shutdown(wait=True)

    def _write_soon(self) -> None:
        self._now.wait(self.delay_s)
        self._write()

    def _write(self) -> None:
        with self._lock:
            tiers, self._pending, self._queued = self._pending, {}, False
        if not tiers:
            return
        try:
            self._registry.set_tiers(tiers)
        except KVChunksError as e:  # the next record or flush retries them; newer ones win
            with self._lock:
                self._pending = tiers | self._pending
            log.warning("could not record the tiers of %d chunks: %s", len(tiers), e)
        except Exception:
            # A bug, which a retry would meet again. Logged: nobody reads the outcome of a
            # background write (_write_soon).
            log.exception("lost the tier records of %d chunks", len(tiers))
            raise
