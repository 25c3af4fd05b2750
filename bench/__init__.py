"""The benchmarks: each runs its competitor in the same run and prints one JSON object last."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(name: str) -> Path:
    """A new folder for this run's data (chunk KV files, the embedded Redis), removed when the
    run ends: a benchmark run again and again must not fill the disk."""
    folder = Path(tempfile.mkdtemp(prefix=f"kvchunks-{name}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def token_range(text: str) -> tuple[int, int]:
    """A command line's MIN-MAX range of token counts."""
    low, high = (int(n) for n in text.split("-"))
    return low, high


def machine(device: str) -> dict[str, str | int]:
    """What a result was measured on: the device, the CPU, torch's threads."""
    import platform

    import torch

    return {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
