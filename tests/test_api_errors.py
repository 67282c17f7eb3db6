"""Every error is OpenAI-shaped, names the parameter and its limit, and harms no other request."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time

import httpx
import openai
import pytest

import api.chat
from api.app import start_draining

MODEL = "tiny-errors"
API_KEY = "sk-test-errors"
MAX_MODEL_LEN = 128
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    with serve_tiny_model(MODEL, api_key=API_KEY, num_kv_blocks=128, max_model_len=MAX_MODEL_LEN) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("extra", "param", "limit"),
    [
        ({"temperature": 2.5}, "temperature", "2"),
        ({"temperature": -0.1}, "temperature", "0"),
        ({"top_p": 1.5}, "top_p", "1"),
        ({"n": 0}, "n", "1"),
        ({"max_tokens": 0}, "max_tokens", "1"),
        ({"max_completion_tokens": -3}, "max_completion_tokens", "1"),
        ({"presence_penalty": 2.5}, "presence_penalty", "2"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "-2"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5", "100"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary"),
        ({"stop": ""}, "stop", "empty"),
        ({"stop": 5}, "stop", "string"),
        ({"seed": 2**64}, "seed", "9223372036854775807"),
        ({"top_k": -2}, "top_k", "-1"),
        ({"min_p": 1.5}, "min_p", "1"),
        ({"repetition_penalty": 0}, "repetition_penalty", "0"),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens", "max_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]", "0"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"tool_choice": "auto"}, "tool_choice", "tools"),
        ({"messages": []}, "messages", "1"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "user"),
        ({"messages": [{"role": "assistant"}]}, "messages[0].content", "tool_calls"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "content"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id", "tool_call_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages[0].content[0].type",
            "text",
        ),
        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs", "tokenize"),
    ],
)
def test_an_invalid_parameter_is_a_400_naming_it_and_its_limit(http, extra, param, limit):
    error = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **extra}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split("[")[0].split(".")[0] in error["message"]
    assert limit in error["message"]


def test_the_sdk_raises_bad_request_with_the_message(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=3)
    assert error.value.status_code == 400
    assert "temperature" in error.value.message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"model": "x", "messages": [', "could not parse the JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "JSON object"),
        (b"\xff\xfe", "JSON"),
    ],
)
def test_malformed_json_is_a_400_not_a_422(http, body, fragment):
    response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert fragment in _error(response, 400)["message"]


def test_a_missing_or_wrong_key_is_a_401_and_health_and_metrics_stay_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/nope")):
            error = _error(httpx.request(method, server.url + path, headers=headers, json={}), 401)
            assert error["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_an_unknown_model_is_a_404(http):
    for path, body in (
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": USER}),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}),
    ):
        error = _error(http.post(path, json=body), 404)
        assert error["param"] == "model" and error["code"] == "model_not_found" and "gpt-4o" in error["message"]
    assert _error(http.get("/v1/models/gpt-4o"), 404)["code"] == "model_not_found"


def test_an_unknown_path_or_method_is_openai_shaped(http):
    assert "Unknown path" in _error(http.get("/v1/nothing-here"), 404)["message"]
    _error(http.get("/v1/chat/completions"), 405)


def test_a_prompt_too_long_is_a_400_with_the_context_length(client, http):
    long_prompt = "the quick brown fox " * 200
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert f"This model's maximum context length is {MAX_MODEL_LEN} tokens" in error.value.message
    assert error.value.code == "context_length_exceeded"
    # Fits alone, but not with the completion it asks for.
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": MAX_MODEL_LEN})
    assert "maximum context length" in _error(response, 400)["message"]
    response = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": True, "max_tokens": 10_000}
    )
    assert "maximum context length" in _error(response, 400)["message"]  # a 400, not an error event


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ],
)
def test_an_image_or_audio_part_on_a_text_only_model_is_a_400_that_says_so(http, part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    error = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}), 400)
    assert error["param"] == "messages[0].content[1]"
    assert "text only" in error["message"] and part["type"] in error["message"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
# The schemas are judged by xgrammar (the dev extra installs it; without it, the 400 says to install it).
NEEDS_XGRAMMAR = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")


def _json_schema(schema: dict | None) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "w", **({"schema": schema} if schema else {})}}


BAD_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}]


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
        pytest.param({"tools": BAD_TOOLS, "tool_choice": "required"}, "tools", "not a valid JSON schema",
                     marks=NEEDS_XGRAMMAR),
        ({"response_format": _json_schema(None)}, "response_format.json_schema.schema", "schema"),
        pytest.param({"response_format": _json_schema({"type": "foo"})}, "response_format", 'Unsupported type "foo"',
                     marks=NEEDS_XGRAMMAR),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ],
)  # fmt: skip
def test_tool_and_response_format_errors_name_the_parameter(http, extra, param, fragment):
    # These were once refused as unsupported; now they are served, and only a bad value is a 400.
    error = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **extra}), 400)
    assert error["param"] == param and error["code"] != "unsupported_parameter"
    assert fragment in error["message"]


def test_invalid_tools_are_rejected_by_validation_first(http):
    bad_tools = [{"type": "function", "function": {"name": "has spaces"}}]
    error = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "tools": bad_tools}), 400)
    assert error["param"] == "tools[0].function.name"


def test_response_format_text_is_plain_generation(client):
    response = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, response_format={"type": "text"}
    )
    assert response.choices[0].message.content is not None


@NEEDS_XGRAMMAR
def test_json_mode_is_served_not_refused(client):
    response = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, response_format={"type": "json_object"}
    )
    assert response.choices[0].message.content.startswith("{")


def test_an_unexpected_failure_is_a_500_without_internals(http, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("secret detail at /home/sluice/api/chat_template.py")

    monkeypatch.setattr(api.chat, "render_chat_prompt", explode)
    error = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER}), 500)
    assert error["type"] == "server_error"
    assert "secret" not in error["message"] and "Traceback" not in error["message"]


def test_bad_requests_do_not_disturb_a_running_stream(client, http):
    result = {}

    def stream() -> None:
        chunks = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=60, stream=True, extra_body={"ignore_eos": True}
        )
        result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

    worker = threading.Thread(target=stream)
    worker.start()
    bad_bodies = [
        {"model": MODEL, "messages": USER, "temperature": 9},
        {"model": MODEL, "messages": [{"role": "user", "content": "x " * 500}]},
        {"model": MODEL, "messages": USER, "logit_bias": {"123456789": 5}},
        {"model": "other", "messages": USER},
    ]
    for body in bad_bodies * 3:
        assert http.post("/v1/chat/completions", json=body).status_code in (400, 404)
    http.post("/v1/completions", json={"model": MODEL, "prompt": [10**8], "max_tokens": 2})
    worker.join(60)
    assert result["finish"] == ["length"]
    assert http.get("/health").status_code == 200


def test_a_draining_server_refuses_new_requests_with_503(server, http):
    app = server.app
    start_draining(app)
    try:
        error = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER}), 503)
        assert error["code"] == "shutting_down"
        assert http.get("/health").status_code == 503
    finally:
        app.state.sluice.admission.draining = False
    assert http.get("/health").status_code == 200


def test_a_batch_with_one_bad_prompt_leaves_the_engine_serving(http):
    # The good prompt's n samples are submitted, then aborted when its neighbour is refused: the
    # abort may reach the engine while the siblings still wait for the shared prompt's blocks.
    for _ in range(20):
        body = {"model": MODEL, "prompt": [[5, 6, 7, 8] * 8, [10**9]], "n": 3, "max_tokens": 4}
        assert _error(http.post("/v1/completions", json=body), 400)["param"] == "prompt"
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_requests_fail_cleanly_and_the_server_exits_1_once_the_in_process_engine_loop_has_died(serve_tiny_model):
    with serve_tiny_model("dying", num_kv_blocks=32, max_model_len=128) as running:
        client = httpx.Client(base_url=running.url, timeout=30)
        engine = running.app.state.sluice.engine
        assert client.get("/health").status_code == 200

        def broken_step():
            raise RuntimeError("simulated engine bug")

        engine.engine.step = broken_step
        body = {"model": "dying", "messages": USER, "max_tokens": 2}
        failed = client.post("/v1/chat/completions", json=body)
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "engine_dead" and "Traceback" not in failed.text
        # An in-process engine has no restart: it is failed for good, so the server stops with exit
        # code 1 and a supervisor takes over. Until it is down, /health and requests say 503.
        deadline = time.monotonic() + 30
        while not running.exited:
            assert time.monotonic() < deadline, "the server kept running with a dead engine"
            with contextlib.suppress(httpx.TransportError):
                assert client.get("/health").status_code == 503
                assert client.post("/v1/chat/completions", json=body).status_code == 503
            time.sleep(0.05)
        assert running.exit_code == 1
