"""`sluice serve` flags: engine settings from --config YAML, overridden by flags; the API key from the env."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import build_parser, engine_config_from_args, module_main


def _serve_args(*flags: str):
    return build_parser().parse_args(["serve", *flags])


def test_defaults_serve_the_demo_model_on_loopback(monkeypatch):
    monkeypatch.delenv("SLUICE_API_KEY", raising=False)
    args = _serve_args()
    assert (args.host, args.port, args.api_key, args.max_waiting_requests) == ("127.0.0.1", 8000, None, None)
    config = engine_config_from_args(args)
    assert config.model is None  # None: the built-in demo model
    assert config.block_size == 16
    assert args.engine_process  # the step loop runs in a child process unless told otherwise
    assert not _serve_args("--no-engine-process").engine_process


def test_engine_flags_reach_the_engine_config():
    args = _serve_args(
        "--model", "some/model",
        "--served-model-name", "chat",
        "--dtype", "bfloat16",
        "--device", "cpu",
        "--block-size", "32",
        "--num-kv-blocks", "100",
        "--gpu-memory-utilization", "0.5",
        "--max-num-seqs", "8",
        "--max-num-batched-tokens", "512",
        "--max-model-len", "1024",
        "--no-enable-prefix-caching",
    )  # fmt: skip
    config = engine_config_from_args(args)
    assert (config.model, config.served_model_name, config.dtype, config.device) == (
        "some/model",
        "chat",
        "bfloat16",
        "cpu",
    )
    assert (config.block_size, config.num_kv_blocks, config.gpu_memory_utilization) == (32, 100, 0.5)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len) == (8, 512, 1024)
    assert config.enable_prefix_caching is False


def test_flags_override_the_config_file_and_the_rest_of_it_stays(tmp_path: Path):
    path = tmp_path / "engine.yaml"
    path.write_text("model: from/yaml\nmax_num_seqs: 4\nblock_size: 32\nenable_prefix_caching: false\n")
    config = engine_config_from_args(_serve_args("--config", str(path), "--max-num-seqs", "16"))
    assert (config.model, config.max_num_seqs, config.block_size) == ("from/yaml", 16, 32)
    assert config.enable_prefix_caching is False


def test_the_api_key_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("SLUICE_API_KEY", "from-env")
    assert _serve_args().api_key == "from-env"
    assert _serve_args("--api-key", "from-flag").api_key == "from-flag"


def test_the_tool_call_parser_flag_names_a_known_format():
    assert _serve_args().tool_call_parser is None  # None: detected from the chat template
    assert _serve_args("--tool-call-parser", "llama3_json").tool_call_parser == "llama3_json"


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--block-size", "7"], "block_size"),
        (["--tool-call-parser", "nope"], "--tool-call-parser"),
        (["--max-waiting-requests", "-1"], "--max-waiting-requests"),
        (["--config", "/nonexistent/engine.yaml"], "engine.yaml"),
    ],
)
def test_bad_settings_exit_2_with_a_message_before_loading_anything(flags, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module_main(flags)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_python_dash_m_api_takes_the_same_flags():
    result = subprocess.run(
        [sys.executable, "-m", "api", "--help"], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0
    for flag in (
        "--model",
        "--served-model-name",
        "--api-key",
        "--config",
        "--max-model-len",
        "--shutdown-timeout",
        "--tool-call-parser",
    ):
        assert flag in result.stdout


def test_a_server_that_cannot_bind_its_port_exits_non_zero():
    """A supervisor (or torchrun, for rank 0) must see a failed start as a failure, not a clean drain."""
    from fastapi import FastAPI

    from api.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve(FastAPI(), host="127.0.0.1", port=port, shutdown_timeout=1, log_level="critical") != 0
