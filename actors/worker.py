"""InferenceWorker: one engine and its paged KV pool behind a Ray actor.

A plain class, wrapped by `ray.remote` at the end of this file. It is a ContextManager per
context name over one ChunkStore, nothing more: every API call runs the plain in-process
code. What it adds is the shared pool, through collaborators handed to the store and used
around each call:

    shared   SharedTiers  KV not in this pool is shipped from a HostStore or a peer before
                          the file or a recompute is tried; KV leaving the pool goes to the
                          node's HostStore, so it outlives this worker; new KV files fit the
                          node's disk budget; an activation's prefetch runs on the worker the
                          router picks; a chunk's tier is the nearest any worker holds
    report   PoolReport   every change of what the pool holds goes to the registry actor, so
                          requests are routed to the worker that holds their chunks
    answers  AnswerStreams  streamed answers, each of which its caller can stop
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import ray
import torch

from kvchunks.actors.answer_stream import AnswerStreams
from kvchunks.actors.kv_transfer import KVPayload
from kvchunks.actors.pool_report import PoolReport
from kvchunks.actors.registry_actor import RegistryClient
from kvchunks.actors.remote import CONTEXT_METHODS
from kvchunks.actors.shared_tiers import SharedTiers
from kvchunks.common import HOME_ENV, InvalidInput, KVChunksError, data_dir
from kvchunks.engine import EngineConfig
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.context_manager import ContextManager
from kvchunks.service.generation import GenerationResult
from kvchunks.service.model_host import ModelHost
from kvchunks.store import redis_server

log = logging.getLogger(__name__)

ANSWERS = ("generate", "chat")  # the methods that stream an answer (see `answer`)

# The concurrency group of the methods that peers, the other actors and clients call beside
# the API (read_kv, prefetch_chunks, forget, report_again, ready, stop_answer): Ray runs them
# on threads of their own, never queued behind the API calls. A call may hold this worker's
# lock while it waits for a peer's read_kv, and every thread the peer has for calls may be
# waiting for the peer's lock, held by a call that waits for ours. These methods wait for no
# lock that a call holds for long, so a few threads are enough.
TRANSFERS = "transfers"


class InferenceWorker:
    def __init__(
        self,
        name: str,
        registry: ray.actor.ActorHandle,
        tier_manager: ray.actor.ActorHandle,
        model: str | None,
        home: str | None,
        redis_url: str,
        engine_options: dict | None = None,
    ):
        if home:  # the data directory also holds the default model, as for the CLI
            os.environ[HOME_ENV] = home
        self.name = name
        self.node_id = ray.get_runtime_context().get_node_id()
        engine = ModelHost(model, data_dir(), EngineConfig(**(engine_options or {})))
        spec = {
            "fingerprint": engine.fingerprint,
            "dtype": engine.engine_config.dtype,
            "shape": engine.kv_shape(),
        }
        self.shared = SharedTiers(registry, tier_manager, name, self.node_id, spec)
        # A worker starts with an empty pool: the tiers recorded in the shared registry say
        # where a chunk was in some worker, not in this one, so nothing is restored.
        self.store = ChunkStore(
            engine,
            home=home,
            registry=RegistryClient(redis_server.connect_url(redis_url), registry),
            peers=self.shared,
            node_memory=self.shared,
            admit_file=self.shared.admit_file,
            hand_over=self.shared.hand_over,
            pool_tiers=self.shared.pool_tiers,
            restore=False,
            holder_name=name,
        )
        self.report = PoolReport(registry, name, self.store.tiers)
        self.answers = AnswerStreams()
        engine.llm  # noqa: B018  (loads the model now: a worker is ready when it can serve)
        self.managers: dict[str, ContextManager] = {}
        self.lock = threading.Lock()  # one API call at a time (background prefetches aside)
        self.deleted: set[str] = set()  # chunks deleted through other workers, to drop here
        self.deleted_lock = threading.Lock()
        self.report.send()  # a restarted worker's pool is empty: forget what its last life held
        self.store.maker.let_go_of_earlier_life()  # and what its calls held when it died

    @ray.method(concurrency_group=TRANSFERS)
    def ready(self) -> bool:
        """Answers once the worker has started (callers wait out a restart with it)."""
        return True

    # -- the API --------------------------------------------------------------------------

    def call(
        self,
        context: str,
        method: str,
        args: tuple = (),
        kwargs: dict | None = None,
        routed: bool = True,
    ) -> tuple[Any, str | None]:
        """Run ContextManager.<method>(*args, **kwargs) for `context`: its result, and the
        worker that a routed caller should send the context's next calls to, if not here
        (see SharedTiers.serving). A caller pinned to this worker passes routed=False."""
        if method not in CONTEXT_METHODS:
            raise InvalidInput(f"ContextManager has no remote method {method!r}")
        with self._serving(context if routed else None):
            manager = self._manager(context)
            if isinstance(getattr(ContextManager, method), property):
                result = getattr(manager, method)
            else:
                result = getattr(manager, method)(*args, **(kwargs or {}))
        return result, self.shared.redirect(context) if routed else None

    # Never re-run by Ray after a crash: the caller gets WorkerDied instead of a generation
    # that starts over (and streams its text twice) long after it gave up.
    @ray.method(num_returns="streaming", max_task_retries=0)
    def answer(
        self,
        context: str,
        method: str,
        kwargs: dict,
        track: bool = False,
        answer_id: str | None = None,
    ) -> Iterator[str | GenerationResult]:
        """Run ContextManager.generate or .chat (`method`) for `context`: yield the answer's
        new text as it comes (when the caller names it with an `answer_id`, for
        `stop_answer`), then the result."""
        if method not in ANSWERS:
            raise InvalidInput(f"ContextManager has no answering method {method!r}")
        run = functools.partial(self._answer, context, method, kwargs, track)
        if answer_id is None:
            yield run()
        else:
            yield from self.answers.stream(answer_id, run)

    @ray.method(concurrency_group=TRANSFERS)
    def stop_answer(self, answer_id: str, keep: bool = False) -> None:
        """The caller of a streamed answer stopped: the answer ends within a layer of the
        model before its first token, or at its next piece. Its listener went away (an HTTP
        client gone): nothing of it is kept. `keep` (a Ctrl-C): what was computed is kept,
        as a Ctrl-C keeps it in process."""
        self.answers.stop(answer_id, keep)

    def _answer(
        self, context, method, kwargs, track, on_text=None, check_stop=None
    ) -> GenerationResult:
        self.shared.redirect(context)  # the client routed this request: that choice stands
        with self._serving():
            manager = self._manager(context)
            call = functools.partial(
                getattr(manager, method), **kwargs, on_text=on_text, check_stop=check_stop
            )
            if not track:
                return call()
            # The client tracks outputs; the manager must know, for output_tokens="manual".
            with manager.track_output():
                return call()

    @contextlib.contextmanager
    def _serving(self, routed_context: str | None = None) -> Iterator[None]:
        """One call at a time, after dropping chunks deleted elsewhere, and report the pool
        after it. With `routed_context`, the call's activations prefetch where the router
        sends that context; else here."""
        with self.lock:
            with self.deleted_lock:
                deleted, self.deleted = self.deleted, set()
            for chunk_hash in self.store.registry.missing(deleted):  # unless added again
                self.store.tiers.forget(chunk_hash)
            try:
                with self.shared.serving(routed_context):
                    yield
            finally:
                self._report()

    def _report(self) -> None:
        """Report the pool after a call. A report that fails (the registry actor restarting)
        is sent again with the next one: the call's outcome stays its own, success or error."""
        try:
            self.report.send()
        except KVChunksError as e:
            log.warning("worker %s could not report its pool: %s", self.name, e)

    @ray.method(concurrency_group=TRANSFERS)
    def forget(self, hashes: list[str]) -> None:
        """These chunks were deleted through another worker: drop them before the next call
        (now could be in the middle of a generation that reads them)."""
        with self.deleted_lock:
            self.deleted.update(hashes)

    def _manager(self, context: str) -> ContextManager:
        if context not in self.managers:
            self.managers[context] = ContextManager(context=context, store=self.store)
        return self.managers[context]

    # -- the shared pool ------------------------------------------------------------------

    @ray.method(concurrency_group=TRANSFERS)
    def read_kv(self, chunk_hash: str) -> KVPayload | None:
        """A copy of the chunk's KV from this pool or host memory (for a peer, a tier store).

        Two workers each waiting on the other's read_kv cannot deadlock: it runs on threads
        that no API call takes (TRANSFERS), and takes no lock. It reads the blocks, then
        checks that the chunk still owns them (eviction takes a chunk out of the pool before
        it frees its blocks).
        """
        tiers = self.store.tiers
        segments = tiers.kv.get(chunk_hash)
        if segments is not None:
            k, v = self.store.model.llm.read_kv(segments)
            if tiers.kv.get(chunk_hash) is segments:
                return KVPayload.from_tensors(k, v)
        host = tiers.host.kv.get(chunk_hash)
        return KVPayload.from_tensors(*host) if host is not None else None

    @ray.method(concurrency_group=TRANSFERS)
    def prefetch_chunks(self, hashes: list[str]) -> None:
        """Bring these chunks into the pool in the background (the TierManager's choice for
        an activation), and report the pool when that is done: no call of this worker's may
        come to report it."""
        for chunk_hash in hashes:
            self.store.prefetcher.prefetch(chunk_hash)
        self.store.prefetcher.after_transfers(self.report.send)

    @ray.method(concurrency_group=TRANSFERS)
    def report_again(self) -> None:
        """Report the pool, changed or not (a restarted registry actor has lost its map), in
        the background, as a prefetch does."""
        self.store.prefetcher.after_transfers(functools.partial(self.report.send, again=True))

    # -- operations -----------------------------------------------------------------------

    def status(self) -> dict:
        store, tiers = self.store, self.store.tiers
        with tiers.lock:  # background transfers change the pool meanwhile
            pool = {
                **self.report.blocks(),
                "chunks": len(tiers.kv),
                "kv_bytes": sum(self.report.kv_bytes(segments) for segments in tiers.kv.values()),
                "host_chunks": len(tiers.host.kv),
                "host_bytes": tiers.host.used_bytes,
            }
        return {
            "name": self.name,
            "node": self.node_id,
            "device": str(store.model.engine_config.device),
            "threads": torch.get_num_threads(),
            "block_size": store.model.block_size,
            **pool,
            "contexts": sorted(self.managers),
            # Copied whole (one step under the GIL): transfers count without the lock.
            "stats": {**store.stats, **self.shared.stats},
            "busy": self.lock.locked(),
        }

    def violations(self) -> list[str]:
        """The registry's and this worker's broken invariants (see ChunkStore.violations)."""
        with self._serving():
            self.store.wait_for_transfers()
            # A transfer may have brought in a chunk deleted meanwhile through another
            # worker, which no forget reached (this pool was not known to hold it): the
            # report drops it, as it does after every call. The audit checks what follows.
            self._report()
            return self.store.violations()

    def evict(self, hashes: list[str] | None = None) -> int:
        """Leave chunks only in their files here (all with None): out of pool and host memory."""
        with self._serving():
            tiers = self.store.tiers
            chosen = [*tiers.kv, *tiers.host.kv] if hashes is None else hashes
            for chunk_hash in chosen:
                self.store.archive_to_disk(self.store.registry.get(chunk_hash))
            return len(chosen)


InferenceWorkerActor = ray.remote(concurrency_groups={TRANSFERS: 4})(InferenceWorker)
