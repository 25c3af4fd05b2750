"""The folders at the root install under one import name, from a wheel and editable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, kvchunks.engine, kvchunks.store.registry, kvchunks.cli.main;"
    "print(kvchunks.engine.__file__);"
    "print(importlib.util.find_spec('engine'))"
)


def run(args: list[str], cwd: Path, **env) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env or None)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_wheel_holds_one_package_and_imports_from_outside(tmp_path):
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("kvchunks-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert all(n.startswith("kvchunks/") for n in modules), modules[:5]
    assert "kvchunks/engine/llm.py" in names and "kvchunks/__init__.py" in names
    assert not any(n.startswith(("kvchunks/tests/", "tests/")) for n in names)
    target = tmp_path / "site"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=tmp_path,
    )
    out = run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, PYTHONPATH=str(target), PATH="/usr/bin:/bin"
    )
    location, engine_spec = out.splitlines()
    assert location.startswith(str(target)) and engine_spec == "None"


def test_editable_install_imports_from_outside(tmp_path):
    out = run([sys.executable, "-c", PROBE], cwd=tmp_path)
    location, engine_spec = out.splitlines()
    assert location == str(ROOT / "engine" / "__init__.py") and engine_spec == "None"
