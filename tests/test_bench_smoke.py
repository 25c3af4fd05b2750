"""Every benchmark runs at a tiny size (`--smoke`) and prints one JSON object as its last line,
so that none breaks silently. The figures are not checked: at these sizes they mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvchunks.bench

# Each takes --smoke; a new benchmark goes here too (the first test makes sure of it).
SMOKE_TESTED = [
    "chunked",
    "cli",
    "cluster",
    "engine",
    "fidelity",
    "http_api",
    "reuse",
    "soak",
    "tiers",
]
# These need CUDA: smoke-tested where there is a device, else they must refuse in one line.
CUDA_ONLY = ["gpu"]
HAS_CUDA = torch.cuda.is_available()
# Ray on loopback, no token file written to ~/.ray, no usage report.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def test_every_benchmark_is_smoke_tested():
    folder = Path(kvchunks.bench.__file__).parent
    found = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    assert found == sorted(SMOKE_TESTED + CUDA_ONLY)


def run_smoke(name: str, cwd: Path) -> subprocess.CompletedProcess:
    """The benchmark at its tiny size; its temporary files go under cwd/tmp (Ray's stay in
    /tmp: its socket paths must stay short)."""
    (cwd / "tmp").mkdir()
    return subprocess.run(
        [sys.executable, "-m", f"kvchunks.bench.{name}", "--smoke"],
        cwd=cwd,
        env={**os.environ, **RAY_ENV, "TMPDIR": str(cwd / "tmp"), "RAY_TMPDIR": "/tmp"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("name", SMOKE_TESTED + (CUDA_ONLY if HAS_CUDA else []))
def test_benchmark_runs_at_a_tiny_size(name, model_path, tmp_path):
    done = run_smoke(name, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert isinstance(json.loads(last), dict), last
    left = sorted(p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("kvchunks-"))
    assert not left, f"{name} left its data behind: {left}"


@pytest.mark.skipif(HAS_CUDA, reason="there is a CUDA device: the benchmark runs instead")
@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_benchmark_refuses_in_one_line_without_cuda(name, tmp_path):
    done = run_smoke(name, tmp_path)
    assert done.returncode == 1 and not done.stdout
    assert len(done.stderr.strip().splitlines()) == 1 and "CUDA" in done.stderr
