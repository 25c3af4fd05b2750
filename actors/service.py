"""A kvchunks service: its named actors on a Ray cluster, started, found, described, stopped.

    registry            RegistryActor   Redis-backed chunk registry; every metadata write; pool map
    tier-manager        TierManager     budgets of each node's host memory and disk; where KV
                                        comes from and goes; prefetch for activations
    host-store-<node>   HostStore       KV in that node's host memory
    disk-store-<node>   DiskStore       KV files on that node's disk
    worker-<i>          InferenceWorker one per GPU (num_gpus=1), or CPU workers where none

The registry and the TierManager are pinned to the node that starts the service (the head,
in cluster.yaml), each store to its node; they take no CPU. Nodes that join later have no
stores: their workers keep evicted KV in their own host memory. Every actor restarts after
a crash (max_restarts=-1): a worker's pool is rebuilt on demand from host memory, peers,
files or tokens, since records and files outlive it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import exceptions as rex
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvchunks.actors.remote import (
    DISK_STORE,
    HOST_STORE,
    NAMESPACE,
    REGISTRY,
    TIER_MANAGER,
    ServiceUnavailable,
    get,
    one_line,
    ray_errors,
    store_name,
    worker_name,
)
from kvchunks.common import InvalidInput

ActorHandle = ray.actor.ActorHandle


@dataclass
class Service:
    registry: ActorHandle
    tiers: ActorHandle
    workers: dict[str, ActorHandle]


def init_ray(address: str | None) -> bool:
    """Connect this process to Ray at `address` (None: start a local Ray). True if this call
    started a local Ray; nothing happens when Ray is already initialised here."""
    if ray.is_initialized():
        return False
    if address is not None:
        _check_reachable(address)
    options = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except (ConnectionError, TimeoutError) as e:
        raise ServiceUnavailable(
            f"no Ray cluster at {address!r} ({one_line(e)}); start one with `ray start --head`"
        ) from None
    return address is None


def _check_reachable(address: str) -> None:
    """Fail at once on a HOST:PORT where nothing listens (Ray would retry for many minutes)."""
    target = os.environ.get("RAY_ADDRESS", address) if address == "auto" else address
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        return  # "auto" and friends: Ray finds (or misses) the local cluster quickly
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise ServiceUnavailable(
            f"no Ray cluster at {target} ({e.strerror or e}); start one with `ray start --head` "
            "or check the address"
        ) from None


def start(
    workers: int | None = None,
    *,
    model: str | Path | None = None,
    home: str | Path | None = None,
    redis_url: str | None = None,
    engine_options: dict | None = None,
    cpus_per_worker: float = 1,
    detached: bool = True,
    timeout: float = 600,
) -> Service:
    """Start the service's actors on the connected cluster and wait until all are ready.

    workers: InferenceWorkers to start (default: one per GPU in the cluster, else 1).
    engine_options: EngineConfig fields for every worker (each resolves its own device).
    redis_url: a Redis server every node can reach (needed with several nodes); without
    one the registry actor runs the embedded server on its node.
    """
    # The actor classes import torch and the engine: only the command that starts them pays.
    from kvchunks.actors.registry_actor import RegistryActor
    from kvchunks.actors.worker import InferenceWorkerActor

    if is_running():
        raise InvalidInput("a kvchunks service already runs on this Ray cluster; stop it first")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    names = [worker_name(i) for i in range(workers or max(gpus, 1))]
    home_dir, model_dir = (str(p) if p else None for p in (home, model))
    common = {"namespace": NAMESPACE, "lifetime": "detached" if detached else None}
    single = _pinned(ray.get_runtime_context().get_node_id(), common)
    # started: the actors other than the registry, each listed as soon as it is made, so
    # that a start that fails halfway leaves none of them behind (their names taken).
    registry, started = None, []
    try:
        stores = _start_stores(home_dir, common, started)
        registry = RegistryActor.options(name=REGISTRY, **single).remote(home_dir, redis_url, names)
        url = get(registry.redis_url.remote(), "starting the registry")
        _check_redis_reach(url, len(stores))
        tiers = _new_tier_manager(registry, list(stores), url, single)
        started.append(tiers)
        get(tiers.ready.remote(), "starting the tier manager")
        options = _worker_options(gpus, cpus_per_worker, common)
        handles = {}
        for name in names:
            handles[name] = InferenceWorkerActor.options(name=name, **options).remote(
                name, registry, tiers, model_dir, home_dir, url, engine_options
            )
            started.append(handles[name])
        _wait([w.ready.remote() for w in handles.values()], timeout)
        get(tiers.connect_workers.remote(names), "starting the tier manager")
    except BaseException:
        _shut_down(registry, started)
        raise
    return Service(registry, tiers, handles)


def _check_redis_reach(url: str, nodes: int) -> None:
    """Refuse a Redis on a unix socket (the embedded server's) in a cluster of several nodes:
    workers on the other nodes could never reach it, and would restart forever."""
    if nodes > 1 and url.startswith("unix://"):
        raise InvalidInput(
            f"the registry's Redis listens on a unix socket, which the other {nodes - 1} "
            "node(s) of this cluster cannot reach; give a Redis URL that every node can "
            "reach (`kvchunks serve --redis-url`, or KVCHUNKS_REDIS_URL)"
        )


def _new_tier_manager(
    registry: ActorHandle, nodes: list[str], url: str, single: dict
) -> ActorHandle:
    """The TierManager actor, started (not yet ready), with the default prefetch policy."""
    from kvchunks.actors.registry_actor import RedisProvenance
    from kvchunks.actors.tier_manager import TierManagerActor
    from kvchunks.policies.budgets import TierBudgets
    from kvchunks.policies.prefetch import make_policy

    policy = make_policy(None, RedisProvenance(url))
    options = {"name": TIER_MANAGER, "max_concurrency": 16, **single}
    return TierManagerActor.options(**options).remote(
        registry, nodes, TierBudgets.from_env(), policy
    )


def _worker_options(gpus: int, cpus_per_worker: float, common: dict) -> dict:
    resources = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_worker}
    return {
        "max_restarts": -1,
        "max_task_retries": 3,  # calls wait out a restart (generate does not: see there)
        "max_concurrency": 8,
        **resources,
        **common,
    }


def _pinned(node: str, common: dict) -> dict:
    """Actor options for a singleton on `node` that takes no CPU and comes back if it dies."""
    here = NodeAffinitySchedulingStrategy(node, soft=False)
    return {**common, "num_cpus": 0, "scheduling_strategy": here, "max_restarts": -1}


def _start_stores(home: str | None, common: dict, started: list[ActorHandle]) -> dict:
    """A HostStore and a DiskStore on every live node, ready (each added to `started` as it
    is made)."""
    from kvchunks.actors.disk_store import DiskStoreActor
    from kvchunks.actors.host_store import HostStoreActor
    from kvchunks.actors.tier_manager import NodeStores

    stores = {}
    for node in (n["NodeID"] for n in ray.nodes() if n["Alive"]):
        on_node = _pinned(node, common)
        host = HostStoreActor.options(name=store_name(HOST_STORE, node), **on_node).remote()
        started.append(host)
        disk = DiskStoreActor.options(name=store_name(DISK_STORE, node), **on_node).remote(home)
        started.append(disk)
        stores[node] = NodeStores(host, disk)
    ready = [a.ready.remote() for s in stores.values() for a in (s.host, s.disk)]
    get(ready, "starting the tier stores")
    return stores


def is_running() -> bool:
    """Whether a kvchunks service runs on the connected cluster."""
    return _lookup(REGISTRY) is not None


def attach() -> Service:
    """The running service's actors on the connected cluster."""
    registry = _lookup(REGISTRY)
    if registry is None:
        raise ServiceUnavailable(
            "no kvchunks service runs on this Ray cluster; start it with `kvchunks serve`"
        )
    names = get(registry.list_workers.remote(), "the registry")
    others = [_lookup(n) for n in (TIER_MANAGER, *names)]
    if any(h is None for h in others):
        raise ServiceUnavailable(
            "the kvchunks service is incomplete; `kvchunks stop` and serve again"
        )
    tiers, *handles = others
    return Service(registry, tiers, dict(zip(names, handles, strict=True)))


def stop() -> list[str]:
    """Stop the service on the connected cluster, whatever part of it still runs: workers
    first, the registry last. Records and KV files stay on disk for the next service."""
    registry = _lookup(REGISTRY)
    names = get(registry.list_workers.remote(), "the registry") if registry else _found_workers()
    others = {n: _lookup(n) for n in (*names, TIER_MANAGER, *_store_names())}
    others = {n: h for n, h in others.items() if h is not None}
    if registry is None and not others:
        raise ServiceUnavailable("no kvchunks service runs on this Ray cluster")
    _shut_down(registry, list(others.values()))
    return [*others, *([REGISTRY] if registry else [])]


def _store_names() -> list[str]:
    """The names of the stores of every node the service started on."""
    kinds = tuple(f"{kind}-" for kind in (HOST_STORE, DISK_STORE))
    found = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in found if a["namespace"] == NAMESPACE and a["name"].startswith(kinds)]


def _found_workers() -> list[str]:
    names = []
    while _lookup(worker_name(len(names))) is not None:
        names.append(worker_name(len(names)))
    return names


def _shut_down(registry: ActorHandle | None, others: list[ActorHandle]) -> None:
    """Kill the actors; the registry last, and asked first to close Redis (an embedded
    server stops with its last client, instead of living on without its actor)."""
    _kill(others)
    if registry is not None:
        with contextlib.suppress(rex.RayError):
            ray.get(registry.shutdown.options(max_task_retries=0).remote(), timeout=30)
        _kill([registry])


def status(service: Service) -> dict:
    """Workers and their pools, the registry, the tiers and the transfers between them."""
    workers = [_worker_status(name, h) for name, h in service.workers.items()]
    up = [w for w in workers if "blocks_total" in w]
    nodes = get(service.tiers.usage.remote(), "the tier manager")
    return {
        "workers": workers,
        "registry": get(service.registry.summary.remote(), "the registry"),
        "tiers": {  # gpu: the workers' pools; cpu: their host memory and the HostStores
            "gpu": {
                "chunks": sum(w["chunks"] for w in up),
                "bytes": sum(w["kv_bytes"] for w in up),
            },
            "cpu": {
                "chunks": _total(nodes, "cpu", "chunks") + sum(w["host_chunks"] for w in up),
                "bytes": _total(nodes, "cpu", "bytes") + sum(w["host_bytes"] for w in up),
            },
            "disk": {key: _total(nodes, "disk", key) for key in ("chunks", "bytes")},
        },
        "nodes": nodes,
        "transfers": get(service.tiers.transfers.remote(), "the tier manager"),
    }


def _total(nodes: dict, tier: str, key: str) -> int:
    return sum(node[tier][key] for node in nodes.values())


def _worker_status(name: str, handle: ActorHandle) -> dict:
    try:
        return ray.get(handle.status.remote(), timeout=10)
    except (rex.RayError, TimeoutError):  # restarting (loading its model) or gone
        return {"name": name, "state": "not responding"}


def _wait(refs: list, timeout: float) -> None:
    try:
        with ray_errors("starting the workers"):
            ray.get(refs, timeout=timeout)
    except rex.GetTimeoutError:
        raise ServiceUnavailable(
            f"the workers were not ready after {timeout:.0f} s: does the cluster have a free GPU "
            "(or CPU) for each? see `ray status`"
        ) from None


def _lookup(name: str) -> ActorHandle | None:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _kill(handles: list[ActorHandle]) -> None:
    for handle in handles:
        ray.kill(handle, no_restart=True)
    for handle in handles:  # a killed actor's next call fails once it is really gone
        with contextlib.suppress(rex.RayError, TimeoutError):
            ray.get(handle.ready.options(max_task_retries=0).remote(), timeout=30)
