"""The server with its engine in a child process (`--engine-process`) behaves as with the in-process
engine: the same tokens through the OpenAI SDK, the same 400s, aborts that free blocks, a clean
stop, and 503s once the child is gone."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from shared_specs import SCHEMAS

MODEL = "tiny-process"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"max_tokens": 12, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    with serve_tiny_model(MODEL, engine_process=True, num_kv_blocks=256) as running:
        yield running


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _kv_blocks_used(server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("sluice_kv_blocks_used "):
            return float(line.split()[1])
    raise AssertionError("no sluice_kv_blocks_used in /metrics")


def test_streamed_and_whole_answers_match_the_in_process_engine(server, serve_tiny_model):
    client = _client(server)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert whole.choices[0].message.content == streamed and whole.usage.completion_tokens == 12
    with serve_tiny_model(MODEL, num_kv_blocks=256) as in_process:
        expected = _client(in_process).chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert streamed == expected.choices[0].message.content
    # The child sends a prompt with a request's first output only; the usage still counts it.
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == expected.usage.prompt_tokens > 0


def test_a_request_the_engine_refuses_is_a_400_and_the_server_carries_on(server):
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10**7)
    assert "maximum context length" in caught.value.message
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert ok.choices[0].finish_reason == "length"


def test_a_stream_closed_early_frees_its_blocks(server):
    client = _client(server)
    body = {"max_tokens": 400, "extra_body": {"ignore_eos": True}}
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **body)
    next(iter(stream))
    assert _kv_blocks_used(server) > 0
    stream.close()
    deadline = time.monotonic() + 10
    while _kv_blocks_used(server) > 0:
        assert time.monotonic() < deadline, "blocks still used after the stream was closed"
        time.sleep(0.05)


def test_the_child_logs_like_the_server_and_stops_with_it(serve_tiny_model, capfd):
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # the child takes the server's level when it starts
    try:
        with serve_tiny_model(MODEL, engine_process=True, num_kv_blocks=64) as running:
            engine = running.app.state.sluice.engine
            assert engine.is_alive
    finally:
        root.setLevel(level)
    assert engine._process.exitcode == 0
    assert "KV cache: 64 blocks of 16 tokens" in capfd.readouterr().err  # the start-up sizing line


def _metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_past_its_restart_bound_the_server_stops_with_exit_code_1(model_dir_factory):
    from api.app import create_app
    from api.server import BackgroundServer
    from engine.config import EngineConfig
    from engine.engine_process import EngineProcess

    model = str(model_dir_factory("llama"))
    config = EngineConfig(model=model, served_model_name=MODEL, device="cpu", num_kv_blocks=64)
    engine = EngineProcess(config, max_restarts_per_minute=0)
    server = BackgroundServer(create_app(engine)).start()
    try:
        os.kill(engine.pid, signal.SIGKILL)
        server._thread.join(60)
        assert not server._thread.is_alive(), "the server kept running with a dead engine"
        assert server.server.exit_code == 1  # what `sluice serve` exits with: a supervisor's cue
    finally:
        server.stop()


def test_a_prompt_crosses_the_pipe_once_and_every_output_still_carries_it():
    from types import SimpleNamespace

    from engine.engine_process import EngineProcess, _without_repeated_prompts
    from engine.outputs import CompletionOutput, RequestOutput

    def step(finished: bool) -> list[RequestOutput]:
        completion = CompletionOutput(index=0, text="x", token_ids=[7])
        return [RequestOutput("r", "Hi", [1, 2, 3], [completion], finished=finished)]

    reported: set[str] = set()
    sent = [_without_repeated_prompts(step(finished), reported) for finished in (False, False, True)]
    assert [s[0].prompt_token_ids for s in sent] == [[1, 2, 3], None, None]  # only the first carries it
    assert not reported  # forgotten once finished
    parent = SimpleNamespace(_prompts={})
    received = [EngineProcess._restore_prompts(parent, outputs) for outputs in sent]
    assert all(r[0].prompt_token_ids == [1, 2, 3] and r[0].prompt == "Hi" for r in received)
    assert parent._prompts == {}


@pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")
def test_json_schema_answers_through_the_child(server):
    """The grammar compiles on the child's validation thread and constrains its sampling."""
    schema = SCHEMAS["nested"]
    response = _client(server).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=120,
        temperature=1.0,
        seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "nested", "schema": schema}},
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


# Last in the module, on the module's server: it kills that server's engine (which serves again by its end).
def test_a_killed_engine_is_restarted_and_its_requests_get_503(server):
    """In flight when the child dies: a stream ends with an error event then [DONE], a plain request
    gets an OpenAI-shaped 503; the gauges drop to idle, /health says 503 until the new child serves."""
    engine = server.app.state.sluice.engine
    old_pid = engine.pid
    restarts = _metric(server, "sluice_engine_restarts_total")
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1500, "ignore_eos": True}
    url = f"{server.url}/v1/chat/completions"
    results: dict = {}

    def streamed() -> None:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            results["stream"] = (response.status_code, [line for line in response.iter_lines() if line])

    def whole() -> None:
        response = httpx.post(url, json=body, timeout=60)
        results["whole"] = (response.status_code, response.json())

    clients = [threading.Thread(target=streamed), threading.Thread(target=whole)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 30
    while _metric(server, "sluice_requests_running") < 2:
        assert time.monotonic() < deadline, "the two requests never ran"
        time.sleep(0.02)
    os.kill(old_pid, signal.SIGKILL)
    for client in clients:
        client.join(30)
        assert not client.is_alive(), "a request in flight never ended"
    # Dead or already restarted, the engine runs nothing and holds no block.
    assert _metric(server, "sluice_requests_running") == 0 and _kv_blocks_used(server) == 0
    health = [httpx.get(f"{server.url}/health").status_code]
    deadline = time.monotonic() + 120
    while health[-1] != 200:
        assert time.monotonic() < deadline, "the engine was not restarted"
        time.sleep(0.1)
        health.append(httpx.get(f"{server.url}/health").status_code)

    status, events = results["stream"]
    assert status == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_dead" and error["type"] == "server_error"
    status, payload = results["whole"]
    assert status == 503 and payload["error"]["code"] == "engine_dead"
    assert health[0] == 503  # a fresh interpreter loading a model takes longer than this poll
    assert engine.pid != old_pid and _metric(server, "sluice_engine_restarts_total") == restarts + 1
    ok = _client(server).chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert ok.choices[0].finish_reason == "length"
