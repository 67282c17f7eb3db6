"""GGUF files -> normal checkpoint directories, converted once into the cache.

transformers reads GGUF itself (with the `gguf` package installed): it dequantizes every tensor
into the float model and rebuilds the tokenizer, its chat template and the config from the file's
metadata. For a 135M model that takes about a minute on a small CPU, most of it parsing metadata in
pure Python, so it is done once: the result is saved as an ordinary checkpoint (config.json,
model.safetensors in float32, tokenizer files with the chat template, generation_config.json) in
`$SLUICE_CACHE_DIR/gguf-<name>-<fingerprint>`, and every later start loads that in seconds through
the same code path as a hub checkpoint.

The fingerprint covers the file's size, modification time and first and last MiB, so a changed or
replaced file converts again (the old directory stays until deleted by hand).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import time
from pathlib import Path

import torch

from engine.models.model_cache import build_once

logger = logging.getLogger(__name__)

# Part of every fingerprint: bump it when the conversion's output changes, so stale caches are not reused.
_RECIPE = "gguf-v1"
_EDGE_BYTES = 1 << 20
SOURCE_RECORD = "sluicegate-source.json"


def is_gguf_file(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def converted_checkpoint(gguf_path: str | Path) -> Path:
    """The checkpoint directory converted from `gguf_path`, converting it now if this is its first use."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Invalid value for 'model': the GGUF file {path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Loading a GGUF file needs the 'gguf' package: pip install gguf")
    return build_once(cache_entry_name(path), lambda out: convert(path, out))


def cache_entry_name(gguf_path: str | Path) -> str:
    """The name of the file's conversion in the cache (`model_cache.cache_root()`)."""
    path = Path(gguf_path).resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)
    return f"gguf-{stem}-{_fingerprint(path)}"


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Writes the float32 checkpoint of `gguf_path` into `out_dir` (transformers' own GGUF reader)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    started = time.monotonic()
    logger.warning(
        "First use of %s: converting it once into %s (about a minute for a small model on a CPU; "
        "later starts load the converted checkpoint in seconds)",
        gguf_path,
        out_dir.parent,
    )
    logger.warning("Converting %s: 1/4 config", name)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    logger.warning("Converting %s: 2/4 tokenizer and chat template", name)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    logger.warning("Converting %s: 3/4 weights (dequantized to float32)", name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, config=config, dtype=torch.float32, **_dequantize_kwargs()
    )
    _drop_quantizer(model, gguf_path)
    logger.warning("Converting %s: 4/4 saving", name)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    stat = gguf_path.stat()
    record = {"gguf_file": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "recipe": _RECIPE}
    (out_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.warning("Converted %s in %.0f s", name, time.monotonic() - started)


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{_RECIPE}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
    with path.open("rb") as file:
        digest.update(file.read(_EDGE_BYTES))
        file.seek(max(0, stat.st_size - _EDGE_BYTES))
        digest.update(file.read(_EDGE_BYTES))
    return digest.hexdigest()[:16]


def _dequantize_kwargs() -> dict:
    # Newer transformers can keep GGUF weights packed (with the `kernels` package); we want the
    # plain float model, which the engine's own kernels and every attention backend run.
    try:
        from transformers import GgufConfig
    except ImportError:  # older versions always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model: torch.nn.Module, gguf_path: Path) -> None:
    """Makes the dequantized model a plain one that save_pretrained writes as float safetensors."""
    packed = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if packed:
        raise RuntimeError(f"transformers left weights of {gguf_path} packed ({packed}); cannot convert it")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # some loaders dequantize but keep the GGUF quantizer attached
        quantizer.remove_quantization_config(model)
