"""Streaming on the wire: SSE bytes, tokens as they come, 32 concurrent streams, disconnects, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from api.streaming import sse_event

MODEL = "tiny-stream"
USER = [{"role": "user", "content": "Tell me a story."}]
NO_EOS = {"ignore_eos": True}  # a vLLM extension: the tiny random model may emit EOS at any step


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    with serve_tiny_model(MODEL, num_kv_blocks=512, max_model_len=2048) as running:
        yield running


def _metrics(server) -> dict[str, float]:
    """The unlabelled samples and the finish_reason counters of /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for line in text.splitlines():
        match = re.match(r'^(sluice_[a-z_]+)(\{finish_reason="(\w+)"\})? ([0-9.e+-]+)$', line)
        if match:
            name = match.group(1) + (f"[{match.group(3)}]" if match.group(3) else "")
            samples[name] = float(match.group(4))
    return samples


async def _wait_until(server, condition, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = _metrics(server)
        if condition(metrics):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met; metrics: {metrics}")
        await asyncio.sleep(0.02)


def _idle(metrics: dict[str, float]) -> bool:
    return metrics["sluice_kv_blocks_used"] == 0 and metrics["sluice_requests_running"] == 0


def test_the_sse_bytes_are_data_lines_ending_with_done(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 5, "stream": True, "n": 2, "extra": "ignored"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        raw = response.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # every event, the last included, ends with a blank line
    assert events[-2] == b"data: [DONE]"
    payloads = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events[:-2])
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert [p["choices"][0]["delta"] for p in payloads[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert "usage" not in payloads[0]  # only with stream_options.include_usage


def test_tokens_reach_the_client_while_the_request_is_still_running(server):
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "stream": True, **NO_EOS}
    arrivals = []
    start = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - start)
    # One event per engine step, not one burst at the end: the first text arrives long before the last.
    assert len(arrivals) > 100
    assert arrivals[0] < 0.5 * arrivals[-1]


async def test_32_concurrent_streams_each_get_exactly_their_own_max_tokens(server):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(max_tokens: int) -> tuple[int, int, list[str]]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Request number {max_tokens}"}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
        num_chunks, usage, finishes = 0, -1, []
        async for chunk in stream:
            if chunk.choices:
                num_chunks += 1
                if chunk.choices[0].finish_reason:
                    finishes.append(chunk.choices[0].finish_reason)
            else:
                usage = chunk.usage.completion_tokens
        return usage, num_chunks, finishes

    wanted = [5 + i for i in range(32)]
    results = await asyncio.gather(*(one(m) for m in wanted))
    await client.close()
    assert [usage for usage, _, _ in results] == wanted
    assert all(finishes == ["length"] for _, _, finishes in results)
    await _wait_until(server, _idle)


async def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    before = _metrics(server)
    body = {"model": MODEL, "messages": USER, "max_tokens": 1800, "stream": True, "n": 2, **NO_EOS}
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            received = 0
            async for line in response.aiter_lines():
                received += line.startswith("data: {")
                if received == 20:
                    break
            running = _metrics(server)
            assert running["sluice_requests_running"] >= 1 and running["sluice_kv_blocks_used"] > 0
    after = await _wait_until(server, _idle)
    assert after["sluice_requests_total[abort]"] == before["sluice_requests_total[abort]"] + 1
    assert after["sluice_generation_tokens_total"] - before["sluice_generation_tokens_total"] < 2 * 1800


async def test_a_client_that_disconnects_before_a_plain_answer_aborts_it(server):
    before = _metrics(server)
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1800, "n": 4, **NO_EOS}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    await _wait_until(server, lambda m: m["sluice_kv_blocks_used"] > 0)
    writer.close()  # gone before the answer: nobody will read it, so the engine must stop
    await writer.wait_closed()
    after = await _wait_until(server, _idle)
    assert after["sluice_requests_total[abort]"] == before["sluice_requests_total[abort]"] + 1
    assert after["sluice_generation_tokens_total"] - before["sluice_generation_tokens_total"] < 4 * 1800


def test_metrics_has_every_series_the_issue_names(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name, kind in [
        ("sluice_requests_running", "gauge"),
        ("sluice_requests_waiting", "gauge"),
        ("sluice_kv_blocks_used", "gauge"),
        ("sluice_kv_blocks_total", "gauge"),
        ("sluice_prompt_tokens_total", "counter"),
        ("sluice_generation_tokens_total", "counter"),
        ("sluice_requests_total", "counter"),
        ("sluice_preemptions_total", "counter"),
        ("sluice_time_to_first_token_seconds", "histogram"),
        ("sluice_inter_token_latency_seconds", "histogram"),
        ("sluice_e2e_request_latency_seconds", "histogram"),
        ("sluice_queue_time_seconds", "histogram"),
    ]:
        assert f"# TYPE {name} {kind}" in text, name
    metrics = _metrics(server)
    assert metrics["sluice_kv_blocks_total"] == 512
    assert metrics["sluice_time_to_first_token_seconds_count"] > 0
    assert metrics["sluice_inter_token_latency_seconds_count"] > 0
    assert metrics["sluice_requests_total[length]"] >= 32


def test_an_event_is_one_line_to_clients_that_split_lines_like_str_splitlines():
    # httpx's aiter_lines (and any reader built on str.splitlines) also breaks at U+0085, U+2028 and
    # U+2029, which JSON leaves raw; a model can emit them. The event must still parse to the payload.
    payload = {"choices": [{"delta": {"content": "a\x85b\u2028c\u2029d\nе"}}]}
    lines = sse_event(payload).decode().splitlines()
    assert lines[0].startswith("data: ") and lines[1:] == [""]
    assert json.loads(lines[0][len("data: ") :]) == payload
