"""Client: ContextManager's API, served by the kvchunks actors on a Ray cluster.

    client = kvchunks.connect("auto")             # attach to a running `kvchunks serve`
    client = kvchunks.connect()                   # start a local Ray and the actors here

A Client has exactly ContextManager's public methods, with the same arguments and return
types (ChunkInfo, ContextView and GenerationResult are dataclasses: they travel as they are).
Each method runs ContextManager's own code on a worker; errors arrive as the kvchunks
exception the worker raised. Paths (load_file, export_chunk, import_chunk) are paths on the
worker's node. A context's requests stick to one worker; generate() first re-routes to the
worker holding most of the context's active KV, and so do populate, move_to_gpu (and
move_chunks to gpu) and prefetch, counting the chunk they bring in. activate_chunk stays on
the context's worker (no routing round trip): the prefetch it starts runs on the worker the
router picks, and the context's next calls follow it there.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from pathlib import Path

import ray

from kvchunks.actors import service as svc
from kvchunks.actors.remote import (
    CONTEXT_METHODS,
    ServiceUnavailable,
    WorkerDied,
    get,
    ray_errors,
    worker_name,
)
from kvchunks.actors.router import Router
from kvchunks.common import InvalidInput, ListenerGone
from kvchunks.engine import SamplingParams
from kvchunks.service.context_manager import ContextManager
from kvchunks.service.generation import GenerationResult
from kvchunks.service.output_tracking import OutputTracker, OutputTracking
from kvchunks.vocabulary import check_callback, check_name

__all__ = ["Client", "ServiceUnavailable", "WorkerDied", "connect"]


def connect(
    address: str | None = None,
    context: str = "default",
    *,
    worker: str | int | None = None,
    workers: int | None = None,
    model: str | Path | None = None,
    home: str | Path | None = None,
    redis_url: str | None = None,
    engine_options: dict | None = None,
) -> Client:
    """A Client of the kvchunks service for `context`.

    address: None starts a local Ray and the actors (embedded Redis unless `redis_url`),
    or joins the service already running where Ray is initialised; "auto" or "ray://..."
    attaches to a running service. worker pins every request to one worker (name or index).
    workers, model, home, redis_url and engine_options configure a service started here.
    """
    owns_ray = svc.init_ray(address)
    try:
        if address is None and not svc.is_running():
            service = svc.start(
                workers,
                model=model,
                home=home,
                redis_url=redis_url,
                engine_options=engine_options,
                detached=False,
            )
        else:
            service = svc.attach()
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    pinned = worker_name(worker) if isinstance(worker, int) else worker
    return Client(service, context, pinned, owns_ray)


class Client(OutputTracking):
    """ContextManager's methods over Ray (see the module docstring)."""

    def __init__(
        self,
        service: svc.Service,
        context: str = "default",
        worker: str | None = None,
        owns_ray: bool = False,
    ):
        if worker is not None and worker not in service.workers:
            raise InvalidInput(f"no worker {worker!r}; workers: {', '.join(service.workers)}")
        self.context_name = check_name(context)
        self._service = service
        self._router = Router(service.registry, worker)
        self._worker = self._router.pick(self.context_name)
        self._owns_ray = owns_ray
        self._trackers: list[OutputTracker] = []
        self.last_generation: GenerationResult | None = None

    def _call(self, method: str, *args, **kwargs):
        moved, into_pool = _moved_chunk(method, args)
        if moved is not None and into_pool:  # go where the chunk is, rather than ship it here
            self._worker = self._router.pick(self.context_name, moved)
        elif moved is not None:  # out of the pool that holds it, not a copy shipped here
            self._worker = self._router.holder(moved) or self._worker
        name, routed = self._worker, self._router.pinned is None
        call = self._service.workers[name].call.remote(
            self.context_name, method, args, kwargs, routed
        )
        result, moved_to = get(call, f"{name} {method}")
        if moved_to in self._service.workers:  # the context's KV gathers there (worker.call)
            self._worker = moved_to
        return result

    # -- methods that need the client's side ------------------------------------------------

    def close(self) -> None:
        """Stop the service and Ray if connect() started them here; else nothing."""
        if self._owns_ray:
            self._owns_ray = False
            svc.stop()
            ray.shutdown()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def with_context(self, context: str, **settings) -> Client:
        """Another context over the same service."""
        client = Client(self._service, context, self._router.pinned)
        if settings:
            client.configure(**settings)
        return client

    def generate(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        mode: str | None = None,
        on_text: Callable[[str], None] | None = None,
        recompute: float | None = None,
        check_stop: Callable[[], None] | None = None,
    ) -> GenerationResult:
        """Answer `prompt` on the worker holding most of the active chunks (see ContextManager);
        on_text receives the answer's text as it streams back. check_stop is called here
        while the answer runs; what it raises stops the worker's answer (as in process)."""
        kwargs = {"prompt": prompt, "params": params, "mode": mode, "recompute": recompute}
        return self._answer("generate", kwargs, on_text, check_stop)

    def chat(
        self,
        messages: list[dict],
        params: SamplingParams | None = None,
        mode: str | None = None,
        on_text: Callable[[str], None] | None = None,
        recompute: float | None = None,
        chunks: list[str] | None = None,
        store: bool = True,
        check_stop: Callable[[], None] | None = None,
    ) -> GenerationResult:
        """ContextManager.chat on the worker holding most of the active chunks; on_text and
        check_stop as in `generate`."""
        kwargs = {
            "messages": messages,
            "params": params,
            "mode": mode,
            "recompute": recompute,
            "chunks": chunks,
            "store": store,
        }
        return self._answer("chat", kwargs, on_text, check_stop)

    def _answer(self, method: str, kwargs: dict, on_text, check_stop) -> GenerationResult:
        check_callback("on_text", on_text)  # both called here, as the answer comes back
        check_callback("check_stop", check_stop)
        self._worker = name = self._router.pick(self.context_name)
        handle = self._service.workers[name]
        get(handle.ready.remote(), f"{name} ready")  # waits while a crashed worker restarts
        stoppable = on_text is not None or check_stop is not None
        answer_id = uuid.uuid4().hex if stoppable else None
        track = bool(self._trackers)
        refs = handle.answer.remote(self.context_name, method, kwargs, track, answer_id)
        what = f"{name} {method}"
        try:
            with ray_errors(what):
                result = _read_answer(refs, on_text, check_stop)
        except KeyboardInterrupt:  # as in process: the answer ends, its part is kept
            if answer_id is None:
                raise
            handle.stop_answer.remote(answer_id, keep=True)
            result = _kept_part(refs, what)
        except BaseException:  # nobody reads the rest: the worker stops, keeping nothing
            if answer_id is not None:
                handle.stop_answer.remote(answer_id)
            raise
        if result is None:
            raise WorkerDied(f"{name} {method} ended without a result; retry the call")
        for tracker in self._trackers:
            tracker.chunks += result.output_chunks
        self.last_generation = result
        return result


# While the next piece of an answer has not come, check_stop is called this often.
STOP_POLL_S = 0.1


def _read_answer(
    refs: ray.ObjectRefGenerator,
    on_text: Callable[[str], None] | None,
    check_stop: Callable[[], None] | None = None,
) -> GenerationResult | None:
    """Pass the answer's text to on_text as it comes, calling check_stop while waiting for
    it; its result (None if it never came)."""
    result = None
    while True:
        if check_stop is not None:
            while not ray.wait([refs], timeout=STOP_POLL_S)[0]:
                check_stop()
            check_stop()
        ref = next(refs, None)
        if ref is None:
            return result
        item = ray.get(ref)
        if not isinstance(item, str):
            result = item
        elif on_text is not None:  # a caller with check_stop alone gets no text
            on_text(item)


def _kept_part(refs: ray.ObjectRefGenerator, what: str) -> GenerationResult | None:
    """What a Ctrl-C keeps of an answer (the text sent before the stop is dropped); one
    stopped before its first token kept nothing, and the Ctrl-C goes on to the caller."""
    try:
        with ray_errors(what):
            return _read_answer(refs, lambda piece: None)
    except ListenerGone:
        raise KeyboardInterrupt from None


# Methods that bring a chunk's KV into the serving worker's pool, and that move it out of it.
_BRINGS_KV = frozenset({"populate", "move_to_gpu", "prefetch"})
_TAKES_KV_OUT = frozenset({"move_to_cpu", "archive_to_disk"})


def _moved_chunk(method: str, args: tuple) -> tuple[str | None, bool]:
    """The chunk whose KV a call moves (its first argument, or for a move of several chunks
    the first of them; None if it moves none), and whether it brings it into the pool."""
    if method in _BRINGS_KV | _TAKES_KV_OUT and args:
        return args[0], method in _BRINGS_KV
    if method == "move_chunks" and args[:1] and args[0]:
        return args[0][0], args[1:2] == ("gpu",)
    return None, False


def _forwarded(name: str, member: object) -> object:
    """Client.<name>: ContextManager.<name> run on the context's worker."""
    if isinstance(member, property):
        return property(lambda self: self._call(name), doc=member.__doc__)

    def method(self: Client, *args, **kwargs):
        return self._call(name, *args, **kwargs)

    method.__name__, method.__qualname__ = name, f"Client.{name}"
    method.__doc__ = member.__doc__
    method.__signature__ = inspect.signature(member)  # type: ignore[attr-defined]
    return method


# One method per ContextManager method, so new ones (tiers, ...) reach the Client by themselves.
for _name in sorted(CONTEXT_METHODS):
    setattr(Client, _name, _forwarded(_name, getattr(ContextManager, _name)))
