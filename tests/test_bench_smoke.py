"""Every benchmark runs at a tiny size (`--smoke`) and prints one JSON object as its last line,
so that none breaks silently. The figures are not checked: at these sizes they mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvchunks.bench

# Each takes --smoke; a new benchmark goes here too (the first test makes sure of it).
SMOKE_TESTED = ["cli", "cluster", "engine", "fidelity", "http_api", "reuse", "soak", "tiers"]
# Ray on loopback, no token file written to ~/.ray, no usage report.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def test_every_benchmark_is_smoke_tested():
    folder = Path(kvchunks.bench.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == SMOKE_TESTED


@pytest.mark.parametrize("name", SMOKE_TESTED)
def test_benchmark_runs_at_a_tiny_size(name, model_path, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", f"kvchunks.bench.{name}", "--smoke"],
        cwd=tmp_path,
        env={**os.environ, **RAY_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert isinstance(json.loads(last), dict), last
