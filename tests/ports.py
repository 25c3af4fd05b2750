"""Loopback ports for the servers the tests start (Redis, Ray, HTTP).

A port is chosen here, released, and bound later by another process, so another process may
take it in between. The kernel hands out ports from its ephemeral range (outgoing connections,
bind to port 0), and Ray draws its own internal ports at random between one such port and
65535: a port from that range can be taken by Ray's dashboard, its agents or any client while
the cluster starts. So the tests draw from below the ephemeral range and above the range Ray
gives its workers by default (10002-19999), where neither the kernel nor Ray hands out ports.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RAY_WORKER_PORTS_END = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default start


def free_port() -> int:
    """A port that is free now, outside the ranges the kernel and Ray pick from."""
    # On a machine whose ephemeral range starts low, some overlap is accepted.
    end = max(_ephemeral_start(), _RAY_WORKER_PORTS_END + 1000)
    for _ in range(100):
        port = random.randrange(_RAY_WORKER_PORTS_END, end)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_RAY_WORKER_PORTS_END}-{end - 1}")
