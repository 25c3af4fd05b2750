"""Shared fixtures: the default model (prepared once), its HF reference, tiny random models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from kvchunks.common import HOME_ENV
from kvchunks.engine import LLM, EngineConfig
from kvchunks.engine.checkpoint import prepare_default_model


@pytest.fixture(scope="session")
def model_path() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="session")
def llm(model_path: Path) -> LLM:
    return LLM(model_path, EngineConfig(kv_cache_bytes=768 << 20))


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, model_path: Path):
    """Build a small random-weight checkpoint of a given family (with the default tokenizer)."""
    made: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family in made:
            return made[family]
        import transformers

        common = dict(
            vocab_size=49152,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            eos_token_id=2,
            bos_token_id=1,
            tie_word_embeddings=False,
        )
        configs = {
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
            "llama": transformers.LlamaConfig,
            "llama-bias": transformers.LlamaConfig,
        }
        classes = {
            "qwen2": transformers.Qwen2ForCausalLM,
            "qwen3": transformers.Qwen3ForCausalLM,
            "llama": transformers.LlamaForCausalLM,
            "llama-bias": transformers.LlamaForCausalLM,
        }
        options = {"llama-bias": dict(attention_bias=True, mlp_bias=True)}
        torch.manual_seed(1234)
        config = configs[family](**common, **options.get(family, {}))
        model = classes[family](config)
        with torch.no_grad():  # random, not zero, biases and norms so they matter in the test
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        for f in model_path.glob("tokenizer*"):
            shutil.copy(f, folder)
        for f in model_path.glob("*.jinja"):
            shutil.copy(f, folder)
        made[family] = folder
        return folder

    return build


@pytest.fixture(scope="session")
def served(model_path: Path, llm: LLM, tmp_path_factory):
    """One HTTP server for the session (tests/test_http.py and tests/test_web_ui.py)."""
    from http_fixture import serve

    with serve(model_path, llm, tmp_path_factory.mktemp("http-home")) as server:
        yield server


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def make_cm(llm, home):
    """ContextManagers on the session engine, each over a store in `home` (or another dir)."""
    from kvchunks.service.chunk_store import ChunkStore
    from kvchunks.service.context_manager import ContextManager

    stores = []

    def make(context: str = "default", at: Path | None = None, **settings) -> ContextManager:
        store = ChunkStore(home=at or home, llm=llm)
        stores.append(store)
        return ContextManager(context=context, store=store, **settings)

    yield make
    for store in stores:
        store.close()
    assert llm.block_manager.num_free == llm.block_manager.num_blocks, "pool blocks leaked"


@pytest.fixture
def make_store(llm, home):
    """ChunkStores on the session engine with given tier budgets."""
    yield from _stores_on(llm, home)


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint) -> LLM:
    """A small random Llama with 256-token blocks, for tests whose many chunks would make the
    default model's steps the whole cost."""
    return LLM(tiny_checkpoint("llama"), EngineConfig(num_blocks=16))


@pytest.fixture
def make_tiny_store(tiny_llm, home):
    """ChunkStores on the tiny engine with given tier budgets."""
    yield from _stores_on(tiny_llm, home)


def _stores_on(llm: LLM, home: Path):
    from kvchunks.service.chunk_store import ChunkStore

    stores = []

    def make(at: Path | None = None, **kwargs):
        store = ChunkStore(home=at or home, llm=llm, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
    assert llm.block_manager.num_free == llm.block_manager.num_blocks, "pool blocks leaked"


@pytest.fixture(autouse=True)
def _data_dir_env_restored():
    """`--data-dir` sets KVCHUNKS_HOME for the rest of its process, as a command should; a
    command run in the test process must not hand it on to the tests after it."""
    before = os.environ.get(HOME_ENV)
    yield
    if before is None:
        os.environ.pop(HOME_ENV, None)
    else:
        os.environ[HOME_ENV] = before
