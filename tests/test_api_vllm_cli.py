"""vLLM command lines: what `vllm serve` users type works with sluicegate, with vLLM's meaning."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from api.cli import build_parser, engine_config_from_args, module_main, server_options_from_args
from api.vllm_flags import check_unknown_flags, human_readable_int
from tests.thinking_model import build_thinking_model_dir

REPO = Path(__file__).parents[1]


def _parse(*flags: str):
    args, unknown = build_parser().parse_known_args(["serve", *flags])
    assert check_unknown_flags(unknown) is None
    return args


def test_the_model_is_positional_as_in_vllm_serve():
    assert engine_config_from_args(_parse("Qwen/Qwen3-0.6B")).model == "Qwen/Qwen3-0.6B"
    assert engine_config_from_args(_parse("--model", "Qwen/Qwen3-0.6B")).model == "Qwen/Qwen3-0.6B"
    assert engine_config_from_args(_parse("a/b", "--model", "a/b")).model == "a/b"
    with pytest.raises(ValueError, match="two models"):
        engine_config_from_args(_parse("a/b", "--model", "c/d"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("4096", 4096), ("4k", 4000), ("4K", 4096), ("32k", 32000), ("25.6k", 25600), ("1M", 2**20), ("1m", 10**6)],
)
def test_max_model_len_takes_vllms_human_readable_values(value, expected):
    assert human_readable_int(value) == expected
    assert engine_config_from_args(_parse("--max-model-len", value)).max_model_len == expected


@pytest.mark.parametrize(("value", "dtype"), [("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16")])
def test_dtype_takes_vllms_names(value, dtype):
    assert engine_config_from_args(_parse("--dtype", value)).dtype == dtype


def test_hub_flags_reach_the_engine_config():
    config = engine_config_from_args(_parse("m", "--trust-remote-code", "--revision", "v2", "-tp", "1"))
    assert (config.trust_remote_code, config.revision) == (True, "v2")
    assert engine_config_from_args(_parse("m")).trust_remote_code is False


def test_several_served_model_names_are_all_accepted_and_the_first_is_reported():
    args = _parse("m", "--served-model-name", "chat", "chat-v2", "gpt-4o")
    assert engine_config_from_args(args).served_model_name == "chat"
    assert server_options_from_args(args).served_model_aliases == ("chat-v2", "gpt-4o")


def test_server_flags_have_vllms_defaults():
    options = server_options_from_args(_parse("m"))
    assert (options.allowed_origins, options.allowed_methods, options.allowed_headers) == (("*",),) * 3
    assert options.allow_credentials is False
    assert options.log_requests is False  # vLLM's default since --enable-log-requests exists
    assert (options.max_logprobs, options.root_path, options.chat_template) == (20, "", None)
    assert server_options_from_args(_parse("m", "--enable-log-requests")).log_requests is True
    assert server_options_from_args(_parse("m", "--disable-log-requests")).log_requests is False
    cors = server_options_from_args(_parse("m", "--allowed-origins", '["https://a.example"]', "--allow-credentials"))
    assert cors.allowed_origins == ("https://a.example",) and cors.allow_credentials


def test_generation_config_gives_request_defaults_as_in_vllm(tmp_path):
    from transformers import GenerationConfig

    from engine.config import EngineConfig

    GenerationConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=99, do_sample=True).save_pretrained(tmp_path)
    config = EngineConfig(model=str(tmp_path))
    auto = server_options_from_args(_parse(str(tmp_path), "--generation-config", "auto"), config)
    assert auto.sampling_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 99}
    elsewhere = server_options_from_args(_parse("m", "--generation-config", str(tmp_path)), EngineConfig(model="m"))
    assert elsewhere.sampling_defaults == auto.sampling_defaults
    for flags in ([], ["--generation-config", "vllm"]):  # OpenAI's defaults unless asked
        assert server_options_from_args(_parse(str(tmp_path), *flags), config).sampling_defaults == {}
    with pytest.raises(OSError, match="no generation_config.json"):
        server_options_from_args(_parse("m", "--generation-config", str(tmp_path / "none")), config)


def test_sampling_defaults_fill_only_what_a_request_leaves_out():
    from api.protocol import ChatCompletionRequest
    from api.sampling import build_sampling_params

    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 99}
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], temperature=0.0)
    params = build_sampling_params(request, max_tokens=None, logprobs=None, vocab_size=100, defaults=defaults)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.0, 0.95, 20, 99)
    plain = build_sampling_params(request, max_tokens=None, logprobs=None, vocab_size=100)
    assert (plain.top_p, plain.top_k, plain.max_tokens) == (1.0, 0, None)


def test_the_chat_template_is_a_file_or_the_template_itself(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[0].content }}")
    assert server_options_from_args(_parse("m", "--chat-template", str(path))).chat_template == path.read_text()
    inline = server_options_from_args(_parse("m", "--chat-template", "{{ messages[0].content }}\\n"))
    assert inline.chat_template == "{{ messages[0].content }}\n"  # escapes read as vLLM reads them
    with pytest.raises(OSError, match="looks like a file path"):
        server_options_from_args(_parse("m", "--chat-template", str(tmp_path / "missing.jinja")))


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["m", "--quantization", "awq"], "--quantization is a vLLM flag that sluicegate does not support"),
        (["m", "--kv-cache-dtype=fp8"], "--kv-cache-dtype is a vLLM flag that sluicegate does not support"),
        (["m", "-pp", "2"], "-pp is a vLLM flag that sluicegate does not support"),
        (["m", "--no-such-flag"], "--no-such-flag is not a sluicegate flag"),
        (["m", "-tp", "0"], "tensor_parallel_size"),
        (["m", "--reasoning-parser", "nope"], "--reasoning-parser"),
        (["m", "--max-model-len", "4.5K"], "decimals are not allowed"),
        (["m", "--max-logprobs", "21"], "max_logprobs"),
        (["a", "b"], "only one model"),
    ],
)
def test_what_we_do_not_support_fails_naming_it_before_loading_anything(flags, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module_main(flags)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_always_on_vllm_flags_are_accepted():
    assert check_unknown_flags(["--enable-chunked-prefill", "--enable-prompt-tokens-details"]) is None
    assert check_unknown_flags(["--disable-log-stats"]) is None
    assert _parse("m").engine_process and not _parse("m", "--disable-frontend-multiprocessing").engine_process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_realistic_vllm_serve_command_line_starts_the_server(tmp_path):
    model = build_thinking_model_dir(tmp_path / "Qwen3-tiny", max_position_embeddings=4096)
    port = _free_port()
    # As copied from a vLLM deployment; only the device, port, cache size and the engine on a thread (one
    # process starts faster) are ours, for a CPU test.
    command = (
        f"serve {model} -tp 1 --enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3 "
        "--disable-log-requests --max-model-len 4k --served-model-name qwen3 Qwen/Qwen3-0.6B "
        "--dtype half --enable-prefix-caching --enable-chunked-prefill --uvicorn-log-level warning "
        "--gpu-memory-utilization 0.9 --max-num-seqs 8 "
        f"--device cpu --port {port} --num-kv-blocks 64 --no-engine-process"
    ).split()
    command[command.index("half")] = "float"  # float16 matmuls on the CPU are slow; the flag still parses
    env = {**os.environ, "SLUICE_API_KEY": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "api", *command],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            assert [m.id for m in client.models.list().data] == ["qwen3", "Qwen/Qwen3-0.6B"]
            response = client.chat.completions.create(
                model="Qwen/Qwen3-0.6B", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        assert response.model == "Qwen/Qwen3-0.6B"
        assert response.usage.completion_tokens >= 1
        assert httpx.get(f"{base}/v1/models/qwen3").json()["max_model_len"] == 4000
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate(timeout=30)
    assert "reasoning parser qwen3" in output
    assert "tool-call parser hermes" in output
