"""Settings, loading and what the engine refuses at load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams

REPO = Path(__file__).resolve().parents[1]


def test_engine_imports_and_runs_without_the_http_stack(model_dir_factory):
    model_dir = model_dir_factory("llama")
    # Block fastapi, uvicorn and pydantic the way a missing package would; the engine must not care.
    code = f"""
import sys
for name in ("fastapi", "uvicorn", "starlette", "prometheus_client"):
    sys.modules[name] = None
from engine import LLM, SamplingParams
llm = LLM(model={str(model_dir)!r}, device="cpu", num_kv_blocks=32)
(out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
assert len(out.outputs[0].token_ids) == 3
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_yaml_settings_load_and_keyword_overrides_win(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("device: cpu\nblock_size: 32\nmax_num_seqs: 8\n")
    config = EngineConfig.from_yaml(path, max_num_seqs=4, model=None)
    assert (config.device, config.block_size, config.max_num_seqs) == ("cpu", 32, 4)
    for shipped in (REPO / "configs").glob("*.yaml"):
        EngineConfig.from_yaml(shipped)  # every shipped file is valid


def test_unknown_or_invalid_settings_name_the_setting(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("max_num_seq: 8\n")
    with pytest.raises(ValueError, match="max_num_seq"):
        EngineConfig.from_yaml(path)
    with pytest.raises(ValueError, match="'block_size'"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="'gpu_memory_utilization'"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_sliding_window_shorter_than_the_context_is_refused(model_dir_factory):
    model_dir = model_dir_factory("mistral", sliding_window=64)
    with pytest.raises(ValueError, match="sliding-window attention"):
        LLM(model=str(model_dir), device="cpu", num_kv_blocks=16)
    # Within the window the model is exactly full attention, so it runs.
    llm = LLM(model=str(model_dir), device="cpu", num_kv_blocks=16, max_model_len=64)
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 2


def test_dummy_weights_build_the_architecture_without_a_checkpoint(tmp_path, model_dir_factory):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((model_dir_factory("qwen3") / "config.json").read_text())
    llm = LLM(model=str(config_only), load_format="dummy", skip_tokenizer_init=True, device="cpu", num_kv_blocks=16)
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("text needs a tokenizer", SamplingParams(max_tokens=1))
