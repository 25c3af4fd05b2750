"""Dependencies run one way, and no module grows too large.

Every import of a kvchunks module in the package's source (at the top, inside functions,
under TYPE_CHECKING, and `importlib`/`runpy` calls with a literal name) is mapped to its layer
and checked against LAYERS. The source is read with `ast`: nothing of the project is imported.
One case per file, named by its path, so a failure says which file and which layer.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kvchunks"
FACE = "face"  # `import kvchunks` / `from kvchunks import Name`: the package's public names
ANY = frozenset({"*"})

# layer -> the layers it may import (besides itself). A dotted entry allows one module of a
# layer: the CLI talks to a cluster through the Ray client and starts or stops the service.
LAYERS: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "vocabulary": frozenset({"common"}),
    "engine": frozenset({"common", "vocabulary"}),
    "store": frozenset({"common", "vocabulary"}),
    "policies": frozenset({"common", "vocabulary", "store"}),
    "service": frozenset({"common", "vocabulary", "engine", "store", "policies"}),
    "actors": frozenset({"common", "vocabulary", "engine", "store", "policies", "service"}),
    # The HTTP server fronts the API: in this process (the face) or on a cluster (the client).
    "server": frozenset({"common", "vocabulary", FACE, "actors.client", "actors.service"}),
    "cli": frozenset(
        {"common", "vocabulary", FACE, "actors.client", "actors.service", "server", "bench"}
    ),
    "bench": ANY,
}
MAX_LINES = 400
LARGE_ALLOWED = {"store/registry.py", "store/kv_file.py"}
NOT_SIZED = {"tests", "bench"}
SKIPPED_DIRS = {"tests", "build", "dist", "__pycache__"}
DYNAMIC_IMPORTS = {"import_module", "run_module", "__import__"}


def package_folders() -> list[Path]:
    """The folders at the root that are part of the package (they hold an __init__.py)."""
    return sorted(
        d
        for d in ROOT.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and d.name not in SKIPPED_DIRS
        and (d / "__init__.py").is_file()
    )


def source_files() -> list[Path]:
    files = list(ROOT.glob("*.py"))
    for folder in package_folders():
        files += [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def layer_of(path: Path) -> str | None:
    """The layer a source file belongs to; None for the package face (__init__.py at the root)."""
    parts = path.relative_to(ROOT).parts
    if len(parts) == 1:
        return None if parts[0] == "__init__.py" else parts[0].removesuffix(".py")
    return parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def target_layer(module: str) -> str | None:
    """The layer of a kvchunks module: "face" for the package itself, "actors.client" for a
    module inside a layer (so a dotted allowance can match), None for anything not ours."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return FACE
    return ".".join(parts[1:3])


def is_module(module: str) -> bool:
    """Whether a dotted kvchunks name is a module or package in the source tree."""
    base = ROOT.joinpath(*module.split(".")[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@cache
def imports(path: Path) -> list[tuple[int, str]]:
    """(line, kvchunks module) for every import of ours in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from kvchunks.actors import service` names a module, `from kvchunks import
                # ChunkInfo` a name of the face.
                found.append(
                    (node.lineno, sub if base.split(".")[0] == PACKAGE and is_module(sub) else base)
                )
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DYNAMIC_IMPORTS and (literal := _literal_prefix(node.args[0])):
                found.append((node.lineno, literal))
    return sorted({(line, m) for line, m in found if m.split(".")[0] == PACKAGE})


def _literal_prefix(arg: ast.expr) -> str | None:
    """A module name given as a string, or the leading literal part of an f-string."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return None


def allowed(layer: str, target: str) -> bool:
    may = LAYERS[layer]
    top = target.split(".")[0]
    return may is ANY or top == layer or target in may or top in may


FILES = source_files()
LAYERED = [p for p in FILES if layer_of(p) is not None]


def test_every_package_folder_and_root_module_has_a_layer():
    layers = {layer_of(p) for p in LAYERED}
    unknown = sorted(layer for layer in layers if layer not in LAYERS)
    assert not unknown, f"add these to LAYERS in {rel(Path(__file__))}: {unknown}"


@pytest.mark.parametrize("path", LAYERED, ids=rel)
def test_imports_follow_the_layers(path: Path):
    layer = layer_of(path)
    assert layer in LAYERS, f"{rel(path)}: no layer {layer!r} in LAYERS"
    wrong = []
    for line, module in imports(path):
        target = target_layer(module)
        assert target is not None
        if target.split(".")[0] not in LAYERS and target != FACE:
            wrong.append(f"line {line}: {module} is in no known layer")
        elif not allowed(layer, target):
            wrong.append(f"line {line}: {module} ({target})")
    may = ", ".join(sorted(LAYERS[layer])) or "nothing"
    assert not wrong, f"{rel(path)} ({layer} may import {may}):\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "path", [p for p in FILES if rel(p).split("/")[0] not in NOT_SIZED], ids=rel
)
def test_module_size(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if rel(path) in LARGE_ALLOWED:
        return
    assert lines <= MAX_LINES, f"{rel(path)} has {lines} lines (at most {MAX_LINES}): split it"
