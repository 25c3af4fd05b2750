"""What every actor and every caller shares at the Ray boundary: the actors' names, and errors
that reach the caller as the typed kvchunks exception an actor raised, in one line."""

from __future__ import annotations

import contextlib
import copyreg
import re
from collections.abc import Iterator
from typing import Any

import ray
from ray import exceptions as rex

from kvchunks.common import AmbiguousHash, KVChunksError, ServiceUnavailable, WorkerDied

NAMESPACE = "kvchunks"  # the Ray namespace of the service's named actors
REGISTRY = "registry"
TIER_MANAGER = "tier-manager"
HOST_STORE = "host-store"  # one per node: host-store-<node id>
DISK_STORE = "disk-store"  # one per node: disk-store-<node id>

# ContextManager's methods that a Client runs on a worker through InferenceWorker.call. The
# others run in the client (close, with_context, track_output) or stream through their own
# actor method (generate, chat). Written out so that a client need not import the engine to
# know them; tests/test_ray_api.py checks the list against ContextManager.
CONTEXT_METHODS = frozenset(
    {
        "activate_chunk",
        "activate_chunks",
        "add_chunk",
        "archive_to_disk",
        "clear",
        "compose_chunks",
        "configure",
        "context",
        "deactivate_chunk",
        "deactivate_chunks",
        "delete_chunk",
        "delete_chunks",
        "delete_context",
        "export_chunk",
        "get_chunk",
        "import_chunk",
        "list_chunks",
        "load_file",
        "move_chunks",
        "move_to_cpu",
        "move_to_gpu",
        "populate",
        "prefetch",
        "provenance",
        "reorder_chunks",
        "same_text",
        "settings",
        "split_chunk",
        "stats",
        "tag_chunk",
        "untag_chunk",
    }
)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def worker_name(index: int) -> str:
    return f"worker-{index}"


def store_name(kind: str, node: str) -> str:
    """The name of a node's HostStore or DiskStore (kind: HOST_STORE or DISK_STORE)."""
    return f"{kind}-{node}"


@contextlib.contextmanager
def ray_errors(what: str) -> Iterator[None]:
    """Raise an actor's kvchunks error as itself, a dead actor as WorkerDied, and Ray's other
    failures as ServiceUnavailable."""
    try:
        yield
    except rex.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, KVChunksError):
            raise cause from None
        if isinstance(cause, BaseException):
            raise cause from e  # a bug or a TypeError: keep the remote traceback attached
        raise
    except rex.RayActorError as e:  # ActorUnavailableError (restarting) included
        if e.actor_init_failed:  # its message ends with the traceback's "Type: message" line
            last = [line for line in _ANSI.sub("", str(e)).splitlines() if line.strip()][-1]
            raise ServiceUnavailable(f"{what} failed: an actor could not start: {last}") from None
        raise WorkerDied(
            f"{what} failed: the actor died or is restarting ({one_line(e)}); retry the call"
        ) from None
    except rex.GetTimeoutError:  # the caller set the timeout, and says what it means
        raise
    except rex.RayError as e:  # an object lost with its owner (a restarted actor), ...
        raise ServiceUnavailable(f"{what} failed: {type(e).__name__} ({one_line(e)})") from None


def one_line(error: Exception) -> str:
    """An error's message on one line, cut short (Ray's run to many lines)."""
    return " ".join(str(error).split())[:200]


def get(refs: Any, what: str = "call") -> Any:
    """`ray.get` with the errors above."""
    with ray_errors(what):
        return ray.get(refs)


def _reduce_ambiguous(error: AmbiguousHash) -> tuple:
    return AmbiguousHash, (error.prefix, error.candidates)


# AmbiguousHash takes (prefix, candidates) but its args hold only the message, so the default
# exception pickling cannot rebuild it: Ray would hand the caller an UnserializableException.
copyreg.pickle(AmbiguousHash, _reduce_ambiguous)
