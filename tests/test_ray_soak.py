"""Eight clients against the two-worker service for a minute (the run of bench/soak.py): only
documented refusals, invariants intact, nothing acknowledged lost, and every answer and every
surviving chunk's KV equal to a one-at-a-time replay in a fresh data directory."""

from __future__ import annotations

import os

import ray
import ray_fixtures

from kvchunks.actors.client import connect
from kvchunks.bench.soak import soak
from kvchunks.engine import EngineConfig

ray_cluster, ray_service = ray_fixtures.ray_cluster, ray_fixtures.ray_service  # used by name

SECONDS = float(os.environ.get("KVCHUNKS_SOAK_SECONDS", "60"))


def test_eight_clients_for_a_minute(ray_service):
    workers = list(ray_service.service.workers.values())
    replay = EngineConfig(kv_cache_bytes=512 << 20)  # the workers' dtype and block size
    report = soak(connect("auto", "soak"), workers, clients=8, seconds=SECONDS, engine=replay)
    print(report.summary())
    assert report.unexpected == [], report.unexpected
    assert report.violations == [], report.violations
    assert report.lost == [], report.lost
    assert report.replay_mismatches == [], report.replay_mismatches
    # It did mix everything, in every context, with answers to replay.
    ran = {op for op, times in report.latencies.items() if times}
    assert ran == {
        "load",
        "activate",
        "deactivate",
        "generate",
        "compose",
        "split",
        "delete",
        "move",
    }
    assert report.generations >= 8 and report.checked_kv >= 8
    served = {c for w in workers for c in ray.get(w.status.remote())["contexts"]}
    assert {f"soak-{i}" for i in range(8)} <= served
