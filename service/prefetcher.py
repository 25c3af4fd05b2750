"""Background prefetch: an activation starts bringing the activated chunk, and what the
prefetch policy expects next, into the pool, so that the next generation finds them there.

Transfers run one at a time on their own thread. A file is read without the pool's lock, so
it overlaps the engine's compute; it takes the lock only to write the pool, between engine
steps (on a GPU that write is a copy on the engine's copy stream, which the next step waits
for on the device). Where several workers share a pool, a `hand_over` may take the
activation's prefetch elsewhere (in a cluster, to the TierManager, which runs the policy for
every worker).
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from kvchunks.common import CapacityError, ChunkNotFound, DtypeMismatch
from kvchunks.policies.prefetch import PrefetchPolicy
from kvchunks.service.compose import Composer
from kvchunks.service.kv_sources import KV, KVLoader
from kvchunks.service.pieces import owner_hashes, owners
from kvchunks.service.tiers import Tiers
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.registry import ChunkRegistry

# (activated chunk, the chunks active before it) -> the chunks to bring in here (none: another
# worker took it over), or None to ask this store's own policy. Asked only when some of the KV
# they read is not in this pool.
HandOver = Callable[[ChunkInfo, list[str]], list[str] | None]


class Prefetcher:
    def __init__(
        self,
        registry: ChunkRegistry,
        tiers: Tiers,
        composer: Composer,
        loader: KVLoader,
        policy: PrefetchPolicy,
        hand_over: HandOver | None = None,
    ):
        self.registry, self.tiers, self.composer = registry, tiers, composer
        self.loader, self.policy, self.hand_over = loader, policy, hand_over
        self.stats = tiers.stats
        self._transfers = ThreadPoolExecutor(1, thread_name_prefix="kvchunks-prefetch")
        self._inflight: dict[str, Future] = {}  # hash -> done when in the pool
        self._inflight_lock = threading.Lock()
        self._closed = False
        # A transfer asked for before a chunk was moved out on purpose does not bring it
        # back: each request is numbered, and each such move notes the number after it.
        self._asked = itertools.count()
        self._pending: set[int] = set()  # the numbers of requests queued or running
        self._moved_out: dict[str, int] = {}  # owner hash -> the number after its move

    def on_activate(self, chunk: ChunkInfo, active: list[str]) -> None:
        """Prefetch for an activation, here or (hand_over) on the worker that the context's
        next request goes to. The hand-over is decided in the background, in the caller's
        contextvars (which say how the call was routed)."""
        if self.tiers.model.started and not self._closed:
            run = contextvars.copy_context().run
            self._transfers.submit(run, self._for_activation, chunk, active, self._ask())

    def moved_out(self, owner_hashes: list[str]) -> None:
        """These chunks' KV is being moved out of the pool on purpose: transfers asked for
        before now leave them out (only those still queued or running could bring them in)."""
        with self._inflight_lock:
            if self._pending:
                after = next(self._asked)
                self._moved_out.update(dict.fromkeys(owner_hashes, after))

    def _ask(self) -> int:
        with self._inflight_lock:
            asked = next(self._asked)
            self._pending.add(asked)
            return asked

    def _answered(self, asked: int) -> None:
        with self._inflight_lock:
            self._pending.discard(asked)
            if not self._pending:  # nothing asked before any move is left to undo it
                self._moved_out.clear()

    def _for_activation(self, chunk: ChunkInfo, active: list[str], asked: int) -> None:
        try:
            wanted, reads = None, [*active, *owner_hashes(chunk)]
            if self.hand_over is not None and not self._all_in_pool(reads):
                wanted = self.hand_over(chunk, active)
            if wanted is None:
                wanted = [chunk.hash, *self.policy.on_activate(chunk, active)]
            for needed in wanted:  # in this task, so that waiting for the transfers covers them
                if self._claim(needed):
                    self._prefetch_one(needed, asked)
        finally:
            self._answered(asked)

    def _all_in_pool(self, hashes: list[str]) -> bool:
        """Whether the KV these chunks read is in this pool. The pool holds the chunks that
        own KV, never views: a view counts through its sources."""
        pool = self.tiers.kv
        try:  # only chunks not in the pool are read: views, and owners elsewhere
            absent = self.registry.get_many(h for h in hashes if h not in pool)
        except ChunkNotFound:  # deleted meanwhile: the hand-over decides, as for any miss
            return False
        return all(h in pool for chunk in absent for h in owner_hashes(chunk))

    def prefetch(self, chunk_hash: str) -> Future | None:
        """Start bringing a chunk's KV into the pool in the background; the future is done
        when it is there (None: it already is)."""
        if chunk_hash in self.tiers.kv or self._closed:
            return None
        asked = self._ask()  # before the claim: a move from now on is after this request
        if self._claim(chunk_hash):
            self._transfers.submit(self._prefetch_alone, chunk_hash, asked)
        else:
            self._answered(asked)
        return self._inflight.get(chunk_hash)

    def _prefetch_alone(self, chunk_hash: str, asked: int) -> None:
        try:
            self._prefetch_one(chunk_hash, asked)
        finally:
            self._answered(asked)

    def _claim(self, chunk_hash: str) -> bool:
        """Mark a transfer as under way; False if one already is, or none is needed."""
        with self._inflight_lock:
            if chunk_hash in self.tiers.kv or chunk_hash in self._inflight:
                return False
            self._inflight[chunk_hash] = Future()
            return True

    def _prefetch_one(self, chunk_hash: str, asked: int) -> None:
        tiers = self.tiers
        try:
            for owner in owners(self.registry, self.registry.get(chunk_hash)):
                if self._moved_out.get(owner.hash, -1) > asked:
                    continue  # moved out since: the install checks again, under the lock
                # Loaded without the lock, so that the read overlaps the engine's compute.
                if owner.hash in tiers.kv or owner.hash in tiers.host:
                    self._install(owner, None, asked)
                    continue
                kv = self.loader.load(owner, keep=True)  # on offer to a generation meanwhile
                try:
                    self._install(owner, kv, asked)
                finally:
                    self.loader.release(owner.hash)
        except (CapacityError, ChunkNotFound, DtypeMismatch):  # a generation says why
            self.stats["prefetch_skipped"] += 1
        finally:
            with self._inflight_lock:
                self._inflight.pop(chunk_hash).set_result(None)

    def _install(self, owner: ChunkInfo, kv: KV | None, asked: int) -> None:
        tiers = self.tiers
        with tiers.lock:
            if owner.hash in tiers.kv or self.registry.missing([owner.hash]):
                return  # there already, or deleted since the transfer started
            if self._moved_out.get(owner.hash, -1) > asked:
                return  # moved out on purpose after this transfer was asked for
            # Handed to the pool through host memory; if the pool has no room, it leaves
            # again: it was never within host memory's budget.
            staged = kv is not None and owner.hash not in tiers.host
            if staged:
                tiers.host.put(owner.hash, *kv)
            try:
                self.composer.owned_kv(owner)
            except BaseException:
                if staged:
                    tiers.host.pop(owner.hash)
                raise
            tiers.prefetched.add(owner.hash)
            self.stats["prefetched"] += 1

    def wait(self) -> None:
        """Block until every background transfer queued so far has finished."""
        self.after_transfers(lambda: None).result()

    def after_transfers(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the background once every transfer queued so far has finished."""
        return self._transfers.submit(fn)

    def close(self) -> None:
        self._closed = True
        self._transfers.shutdown(wait=True)
