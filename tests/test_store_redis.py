"""The Redis server: embedded with AOF, shared between processes, durable across kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import kvchunks
from kvchunks.common import InvalidInput, RegistryUnavailable, data_dir
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.hashing import content_hash
from kvchunks.store.redis_server import (
    DB_FILENAME,
    close,
    connect,
    connect_embedded,
    connect_url,
    redact,
)
from kvchunks.store.registry import ChunkRegistry

H = "ab" * 32

# Another process: once told to go, it joins the server for a data dir, reports the server's
# pid and a key the parent wrote, and stays connected a while. It loads only the store:
# kvchunks/__init__ imports the engine (torch, transformers: seconds per process), which the
# store does not need, so the package is registered without running that __init__.
CHILD = """
import json, sys, time, types
from pathlib import Path
package, linger = sys.argv[1], float(sys.argv[4])
data_dir, go = Path(sys.argv[2]), Path(sys.argv[3])
root = types.ModuleType("kvchunks")
root.__path__ = [package]
sys.modules["kvchunks"] = root
from kvchunks.store.redis_server import connect_embedded
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
client = connect_embedded(data_dir)
client.incr("joined")
print(json.dumps({"pid": client.pid, "seen": (client.get("from-parent") or b"").decode()}))
time.sleep(linger)
"""
PACKAGE = str(Path(kvchunks.__file__).parent)


def _chunk() -> ChunkInfo:
    return ChunkInfo(hash=H, content_hash=content_hash([1, 2]), token_ids=[1, 2], text="kept")


def _alive(socket: str) -> bool:
    probe = redis.Redis(
        unix_socket_path=socket, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(probe.ping())
    except redis.RedisError:
        return False
    finally:
        probe.close()


def _children(data_dir: Path, count: int, linger: float) -> list[dict]:
    """Run `count` CHILD processes that all connect at the same moment (after their imports)."""
    go = data_dir.parent / f"{data_dir.name}.go"
    env = {k: v for k, v in os.environ.items() if k != "KVCHUNKS_REDIS_URL"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, PACKAGE, str(data_dir), str(go), str(linger)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    return results


def test_embedded_server_is_durable_by_configuration(tmp_path):
    client = connect_embedded(tmp_path)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("dir") == {"dir": str(tmp_path / "redis")}
        client.set("k", "v")
        assert (tmp_path / "redis" / "appendonly.aof").stat().st_size > 0
    finally:
        close(client)


def test_records_survive_close_and_reopen(tmp_path):
    client = connect_embedded(tmp_path)
    socket = client.socket_file
    registry = ChunkRegistry(client)
    registry.put(_chunk())
    registry.activate("default", H)
    close(client)
    assert not _alive(socket)  # the server really stopped

    client = connect_embedded(tmp_path)
    try:
        registry = ChunkRegistry(client)
        assert registry.get(H).text == "kept"
        assert registry.active("default") == [H]
    finally:
        close(client)


def _kill(client: redis.Redis) -> int:
    """SIGKILL the client's server and wait until its socket refuses; returns its pid."""
    pid, socket = client.pid, client.socket_file
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(socket) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pid


def test_a_killed_server_starts_again_with_every_acknowledged_write(tmp_path):
    client = connect_embedded(tmp_path)
    registry = ChunkRegistry(client)
    registry.put(_chunk())
    registry.activate("default", H)
    killed = _kill(client)
    assert registry.get(H).text == "kept"  # the next call starts it again, on the same AOF
    assert registry.active("default") == [H]
    assert client.pid not in (0, None, killed)
    joined = connect_embedded(tmp_path)  # a new client joins the server started again
    try:
        assert joined.pid == client.pid
        registry.deactivate("default", H)
        assert ChunkRegistry(joined).active("default") == []
    finally:
        close(joined)
    socket = client.socket_file
    close(client)  # the last client: the server started again stops as the first would
    assert not _alive(socket) and not Path(socket).parent.exists()


def test_a_server_that_cannot_start_again_is_one_clear_line(tmp_path):
    client = connect_embedded(tmp_path)
    registry = ChunkRegistry(client)
    registry.put(_chunk())
    _kill(client)
    aof = tmp_path / "redis" / "appendonly.aof"
    aof.rename(aside := aof.with_suffix(".aside"))
    aof.mkdir()  # a server cannot read its append-only file there: it does not start
    try:
        with pytest.raises(RegistryUnavailable) as info:
            registry.get(H)
        assert "cannot start again" in str(info.value) and "\n" not in str(info.value)
    finally:
        aof.rmdir()
        aside.rename(aof)
        close(client)
    fresh = connect_embedded(tmp_path)  # once it can, the data is all there
    try:
        assert ChunkRegistry(fresh).get(H).text == "kept"
    finally:
        close(fresh)


def test_stale_record_with_a_reused_pid_is_not_trusted(tmp_path):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    pidfile = tmp_path / "gone.pid"
    pidfile.write_text(str(os.getpid()))  # a live process, but no Redis behind the socket
    settings = {
        "pidfile": str(pidfile),
        "unixsocket": str(tmp_path / "gone.socket"),
        "dbdir": str(redis_dir),
        "dbfilename": DB_FILENAME,
    }
    (redis_dir / f"{DB_FILENAME}.settings").write_text(json.dumps(settings))
    client = connect_embedded(tmp_path)
    try:
        assert client.ping() and client.socket_file != settings["unixsocket"]
    finally:
        close(client)


def test_second_process_joins_the_running_server(tmp_path):
    client = connect_embedded(tmp_path)
    try:
        client.set("from-parent", "hello")
        (child,) = _children(tmp_path, 1, 0)
        assert child == {"pid": client.pid, "seen": "hello"}
        assert client.get("joined") == b"1"
        assert client.ping()  # the child's exit did not stop the server we still use
    finally:
        close(client)


def test_concurrent_starts_share_one_server(tmp_path):
    children = _children(tmp_path, 3, 0.3)
    assert len({c["pid"] for c in children}) == 1
    client = connect_embedded(tmp_path)  # the last child stopped it; its data is on disk
    try:
        assert client.get("joined") == b"3"
    finally:
        close(client)


def test_url_mode_uses_that_server(tmp_path, monkeypatch):
    embedded = connect_embedded(tmp_path / "a")
    try:
        embedded.set("where", "a")
        url = f"unix://{embedded.socket_file}"
        assert connect_url(url).get("where") == b"a"
        monkeypatch.setenv("KVCHUNKS_REDIS_URL", url)
        via_env = connect(data_dir=tmp_path / "b")
        assert via_env.get("where") == b"a"
        assert not (tmp_path / "b").exists()  # no embedded server was started
        via_env.close()
    finally:
        close(embedded)


def test_url_password(tmp_path):
    embedded = connect_embedded(tmp_path)
    embedded.config_set("requirepass", "s3cret")
    try:
        socket = embedded.socket_file
        with pytest.raises(RegistryUnavailable) as info:
            connect_url(f"unix://:wrong@{socket}")
        assert "wrong" not in str(info.value) and "***" in str(info.value)
        good = connect_url(f"unix://:s3cret@{socket}")
        assert good.ping()
        good.close()
    finally:
        embedded.config_set("requirepass", "")
        close(embedded)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "unix:///nonexistent/redis.sock"])
def test_unreachable_server_is_one_clear_line(url):
    with pytest.raises(RegistryUnavailable, match="not reachable") as info:
        connect_url(url)
    assert "\n" not in str(info.value)


def test_malformed_url_is_invalid_input():
    with pytest.raises(InvalidInput, match="not a Redis URL"):
        connect_url("http://example.com")


def test_unusable_data_dir_is_registry_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryUnavailable, match="cannot start the embedded Redis"):
        connect_embedded(blocker)


def test_default_data_dir_follows_kvchunks_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHUNKS_HOME", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("KVCHUNKS_HOME")
    assert data_dir() == Path.home() / ".local" / "share" / "kvchunks"


def test_redact_hides_only_the_password():
    assert redact("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact("redis://host:6379") == "redis://host:6379"
