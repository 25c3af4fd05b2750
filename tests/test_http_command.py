"""`kvchunks http` as the real command: stopped as a service manager stops it (SIGTERM), it
shuts down and takes its embedded Redis with it, as Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from ports import free_port

KVCHUNKS = str(Path(sys.executable).with_name("kvchunks"))


def redis_servers_of(home: Path) -> list[psutil.Process]:
    """The redis-server processes serving this data directory (they run in its redis/)."""
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        if proc.info["name"] == "redis-server" and proc.info["cwd"] == str(home / "redis"):
            found.append(proc)
    return found


def test_sigterm_stops_the_server_and_its_embedded_redis(tmp_path, model_path):
    home, port = tmp_path / "home", free_port()
    env = {**os.environ, "KVCHUNKS_HOME": str(home), "KVCHUNKS_MODEL": str(model_path)}
    server = subprocess.Popen(
        [KVCHUNKS, "http", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    redis = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/chunks").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.2)
        redis = redis_servers_of(home)
        assert len(redis) == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(redis, timeout=10)
        assert not alive, "the embedded Redis outlived the server"
    finally:
        server.kill()
        server.wait()
        for proc in redis:
            if proc.is_running():
                proc.kill()


def test_sigterm_during_a_generate_keeps_nothing_of_it(tmp_path, model_path):
    """Ctrl-C keeps an answer the user stopped; SIGTERM ends the process, and the request
    is taken back whole, prompt included. The exit status says why it ended."""
    home = tmp_path / "home"
    env = {**os.environ, "KVCHUNKS_HOME": str(home), "KVCHUNKS_MODEL": str(model_path)}
    command = [KVCHUNKS, "generate", "Write a long story about a lighthouse.", "--max-tokens"]
    run = subprocess.Popen(
        [*command, "2000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert run.stdout.read(20), run.stderr.read()  # it is answering
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        run.kill()
        run.wait()
    listed = subprocess.run(
        [KVCHUNKS, "list", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed.stdout
