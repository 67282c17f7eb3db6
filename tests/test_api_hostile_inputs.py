"""Hostile input: every case of the corpus (benchmarks/hostile_inputs.py) is a 4xx in the OpenAI
error shape and leaves the server serving; oversized bodies are 413s; a large body being processed
does not stall other requests; what --api-key leaves open."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from api.app import create_app
from api.body_limit import DEFAULT_MAX_REQUEST_BODY_BYTES
from api.cli import build_parser, main
from api.server import BackgroundServer
from api.tool_parsers import get_tool_parser
from benchmarks.hostile_inputs import CASES, CHAT, MODEL, HostileCase
from engine.models.demo_model import DEMO_MODEL_ID

API_KEY = "sk-test-hostile"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    with serve_tiny_model(MODEL, api_key=API_KEY, num_kv_blocks=64, max_model_len=256) as running:
        yield running


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


def _assert_openai_error(response: httpx.Response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _send(http: httpx.Client, case: HostileCase) -> httpx.Response:
    return http.request(case.method, case.path, content=case.body, headers=case.headers)


def _assert_serving_and_idle(http: httpx.Client, server) -> None:
    answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
    assert http.get("/health").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        stats = server.app.state.sluice.engine.stats()
        if stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)
    assert server.app.state.sluice.admission.num_active == 0


def test_every_hostile_case_is_a_4xx_in_the_openai_shape_and_the_server_keeps_serving(http, server):
    assert len({case.name for case in CASES}) == len(CASES)
    assert MODEL == DEMO_MODEL_ID  # the cases name the model `sluice serve` serves by default
    for case in CASES:
        _assert_openai_error(_send(http, case))
    _assert_serving_and_idle(http, server)


@pytest.mark.parametrize(
    ("name", "param"),
    [
        ("prompt with a lone surrogate escape", "prompt"),
        ("prompt with raw surrogate bytes ED A0 80", "prompt"),
        ("chat content with a lone low surrogate", "messages[0].content"),
        ("unknown model name with a lone surrogate", "model"),
        ("json_schema nested 300 levels", "response_format.json_schema.schema.properties"),
        ("chat_template_kwargs nested 900 levels", "chat_template_kwargs.x[0][0]"),
        ("tool parameters nested 900 levels", "tools[0].function.parameters"),
        ("tool call arguments of 1000 open brackets", "messages[1].tool_calls[0].function.arguments"),
        ("tool call arguments nested 500 levels", "messages[1].tool_calls[0].function.arguments"),
        ("temperature NaN", "temperature"),
        ("repetition_penalty Infinity", "repetition_penalty"),
        ("repetition_penalty 1e308", "repetition_penalty"),
        ("logit_bias value NaN", "logit_bias.5"),
        ("top_k 1e30", "top_k"),
        ("n true", "n"),
        ("n 2.0", "n"),
        ("10k stop strings", "stop"),
        ("seed 2**64", "seed"),
    ],
)
def test_the_issue_11_cases_are_400s_naming_the_parameter(http, name, param):
    (case,) = [c for c in CASES if c.name == name]
    error = _assert_openai_error(_send(http, case))
    assert error["param"] == param, error
    assert _send(http, case).status_code == 400  # and again: not a 500 on some later try


def test_a_temperature_below_the_epsilon_answers_greedily(http):
    def answer(temperature: float) -> str:
        body = {"model": MODEL, "messages": USER, "max_tokens": 12, "temperature": temperature, "ignore_eos": True}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert answer(1e-45) == answer(1e-38) == answer(0.0)


# ---- body size --------------------------------------------------------------------------------

LIMIT = 4096


@pytest.fixture(scope="module")
def small_limit(server):
    """A second app on the same engine, with a 4 KiB body limit."""
    app = create_app(server.app.state.sluice.engine, shutdown_engine=False, max_request_body_bytes=LIMIT)
    with BackgroundServer(app) as running:
        yield running


def _padded_chat(size: int) -> bytes:
    body = json.dumps({"model": MODEL, "messages": USER, "max_tokens": 2, "user": ""}).encode()
    return body.replace(b'"user": ""', b'"user": "' + b"x" * (size - len(body)) + b'"')


def test_a_body_over_the_limit_is_a_413_and_one_at_the_limit_is_served(small_limit):
    with httpx.Client(base_url=small_limit.url, timeout=60) as client:
        ok = client.post(CHAT, content=_padded_chat(LIMIT), headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text
        too_big = client.post(CHAT, content=_padded_chat(LIMIT + 1), headers={"Content-Type": "application/json"})
        error = _assert_openai_error(too_big)
        assert too_big.status_code == 413 and error["code"] == "request_too_large" and str(LIMIT) in error["message"]

        def chunks():  # no Content-Length: sent chunked, counted as it arrives
            body = _padded_chat(3 * LIMIT)
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        streamed = client.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and _assert_openai_error(streamed)["code"] == "request_too_large"
        assert client.get("/health").status_code == 200


def test_the_body_limit_flag_defaults_to_32_mib_and_refuses_nonsense():
    assert build_parser().parse_args(["serve"]).max_request_body_bytes == DEFAULT_MAX_REQUEST_BODY_BYTES == 32 << 20
    assert build_parser().parse_args(["serve", "--max-request-body-bytes", "1000"]).max_request_body_bytes == 1000
    with pytest.raises(SystemExit):
        main(["serve", "--max-request-body-bytes", "0"])  # refused before any model loads


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body_is_sent(small_limit):
    # A client announces 1 GB and sends nothing: the answer must come without waiting for the body.
    with socket.create_connection(("127.0.0.1", small_limit.port), timeout=10) as sock:
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**9}\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection without answering"
            response += chunk
    assert response.startswith(b"HTTP/1.1 413")


def test_health_answers_promptly_while_a_large_body_is_processed(server):
    # 100k one-word messages (3.7 MB): parsing, validating and rendering them took seconds, all on
    # the event loop, during which /health and every other request waited (4.7 s in issue 11).
    body = json.dumps({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "word"}] * 100_000})
    result = {}

    def send_big() -> None:
        started = time.monotonic()
        result["response"] = httpx.post(
            server.url + CHAT, content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=300
        )
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=send_big)
    worker.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        while worker.is_alive():
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    worker.join()
    assert result["response"].status_code == 400  # far longer than the context
    assert len(latencies) >= 5, result["seconds"]  # it really was processed for a while
    # Relative to the body's own time, so that a slow machine slows both: stalled, /health took as
    # long as the body (4.7 s of 5); now the longest single C call (json.loads of 3.7 MB) is the bound.
    assert max(latencies) < 0.25 * result["seconds"], (max(latencies), result["seconds"])


# ---- what --api-key protects --------------------------------------------------------------------


def test_the_api_key_guards_v1_and_leaves_health_metrics_and_docs_open(server):
    # As vLLM does: /v1 (models, completions, anything under it) needs the key. The probes and the
    # API's description stay open: they hold no model output or user data, and load balancers,
    # Prometheus and people reading the docs have no key.
    for path in ("/health", "/metrics", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert httpx.get(server.url + "/openapi.json").json()["paths"][CHAT]
    for path in ("/v1/models", f"/v1/models/{MODEL}"):
        assert _assert_openai_error(httpx.get(server.url + path))["code"] == "invalid_api_key"


# ---- hostile model output -----------------------------------------------------------------------


@pytest.mark.parametrize("arguments_key", ["arguments", "parameters"])
def test_a_tool_call_nested_past_the_recursion_limit_is_not_a_call_and_not_a_crash(arguments_key):
    # A model can be led to write "[" two thousand times; json.loads then raises RecursionError.
    deep = "[" * 2000 + "]" * 2000
    call = f'{{"name": "f", "{arguments_key}": {deep}}}'
    for name, text in (("hermes", f"<tool_call>\n{call}\n</tool_call>"), ("llama3_json", call)):
        parsed = get_tool_parser(name).parse(text)
        assert parsed.calls == [], name
