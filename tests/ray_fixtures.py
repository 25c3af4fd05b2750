"""One local Ray cluster and one kvchunks service (2 CPU workers) per test session.

Imported by the tests/test_ray_*.py modules. pytest makes a separate session fixture for each
module that imports one, so the cluster and the service are kept here and built only once.

The cluster is a real `ray start --head` (with the dashboard, for `ray job submit`) on
loopback ports in a temporary directory. At the end only its own processes are stopped:
`ray stop` would stop every Ray process on the machine, other users' included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from ports import free_port

BIN = Path(sys.executable).parent
_STATE: dict[str, object] = {}
# How `ray start` says that a port was taken: before it starts (its own check), or after.
PORT_TAKEN = ("already occupied", "address already in use")


@dataclass
class Cluster:
    address: str  # the GCS, for ray.init and `kvchunks --address`
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit`
    temp_dir: str
    env: dict[str, str]  # environment for Ray and kvchunks command lines


@dataclass
class RayService:
    service: object  # kvchunks.actors.service.Service
    home: Path  # the service's data directory (KV files, embedded Redis)
    http_url: str  # the HTTP API that `kvchunks serve --http` deployed with Ray Serve

    def worker(self, name: str):
        return self.service.workers[name]

    def stats(self, name: str) -> dict[str, int]:
        import ray

        return ray.get(self.worker(name).status.remote())["stats"]


def _once(request: pytest.FixtureRequest, key: str, make: Callable, stop: Callable):
    if key not in _STATE:
        _STATE[key] = make()
        request.addfinalizer(lambda: stop(_STATE.pop(key)))
    return _STATE[key]


@pytest.fixture(scope="session")
def ray_cluster(request) -> Cluster:
    return _once(request, "cluster", _start_cluster, _stop_cluster)


@pytest.fixture(scope="session")
def ray_service(request, ray_cluster: Cluster, model_path: Path, tmp_path_factory) -> RayService:
    def start() -> RayService:
        return _start_service(ray_cluster, model_path, tmp_path_factory.mktemp("ray-home"))

    return _once(request, "service", start, _stop_service)


def _start_cluster() -> Cluster:
    import ray

    # A port chosen free can still be taken before Ray binds it; such a start is tried again.
    for _ in range(3):
        cluster, failure = _ray_start()
        if not failure:
            break
        _stop_cluster(cluster)
        if not any(words in failure for words in PORT_TAKEN):
            break
    if failure:
        pytest.fail(f"ray start failed: {failure[-2000:]}")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=cluster.address, namespace="kvchunks", log_to_driver=False)
    return cluster


def _ray_start() -> tuple[Cluster, str]:
    """`ray start --head` on fresh ports: the cluster and its error output if it failed."""
    temp = tempfile.mkdtemp(prefix="kvray")  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard, agent, client = (free_port() for _ in range(4))
    # Token authentication would need ~/.ray/auth_token on every command line: not for a
    # throw-away loopback cluster.
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=4",
        "--object-store-memory=600000000",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    cluster = Cluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp, env)
    return cluster, done.stderr if done.returncode else ""


def _stop_cluster(cluster: Cluster) -> None:
    import ray

    ray.shutdown()
    os.environ.pop("RAY_AUTH_MODE", None)
    port = cluster.address.rsplit(":", 1)[1]
    me = os.getpid()
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if proc.pid != me and any(cluster.temp_dir in a or f":{port}" in a for a in args):
            roots.append(proc)
    procs = {p.pid: p for root in roots for p in [root, *_children(root)] if p.pid != me}
    for proc in procs.values():
        _signal(proc.terminate)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for proc in alive:
        _signal(proc.kill)
    psutil.wait_procs(alive, timeout=3)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)  # its logs and sockets: 4 MB a run


def _start_service(cluster: Cluster, model: Path, home: Path) -> RayService:
    from kvchunks.actors import service

    command = [
        str(BIN / "kvchunks"),
        "--data-dir",
        str(home),
        "--model",
        str(model),
        "serve",
        "--workers",
        "2",
        "--address",
        cluster.address,
        "--kv-cache-mb",
        "256",
        "--http",
        str(http_port := free_port()),
    ]
    done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "serving with 2 worker(s)" in done.stdout and "HTTP API on" in done.stdout
    return RayService(service.attach(), home, f"http://127.0.0.1:{http_port}")


def _stop_service(running: RayService) -> None:
    cluster = _STATE["cluster"]
    command = [str(BIN / "kvchunks"), "stop", "--address", cluster.address]
    done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(send: Callable[[], None]) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        send()
