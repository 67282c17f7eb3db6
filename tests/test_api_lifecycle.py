"""`python -m api` as a real process: the waiting queue's 429, then a SIGTERM drain that exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

MODEL = "tiny-lifecycle"
API_KEY = "sk-test-lifecycle"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
NO_EOS = {"ignore_eos": True}  # a vLLM extension: the tiny random model may emit EOS at any step


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir_factory):
    port = _free_port()
    command = [
        sys.executable, "-m", "api",
        "--model", str(model_dir_factory("llama")),
        "--served-model-name", MODEL,
        "--device", "cpu",
        "--port", str(port),
        "--max-num-seqs", "1",  # one running request; the next ones wait
        "--max-waiting-requests", "1",
        "--num-kv-blocks", "256",
        "--max-model-len", "2048",
        "--shutdown-timeout", "60",
        "--log-level", "warning",
    ]  # fmt: skip
    # The key comes from the environment, as a deployment would pass a secret.
    env = {**os.environ, "SLUICE_API_KEY": API_KEY}
    process = subprocess.Popen(command, env=env, cwd=Path(__file__).parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start (exit code {process.poll()})")
        time.sleep(0.1)
    process.url = url  # type: ignore[attr-defined]
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _wait_for(url: str, name: str, value: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _gauge(url, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.02)


async def test_a_full_waiting_queue_answers_429_with_retry_after(server):
    url = server.url
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1500, "stream": True, **NO_EOS}
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60) as client:

        async def hold(started: asyncio.Event) -> None:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    started.set()

        first, second = asyncio.Event(), asyncio.Event()
        running = asyncio.ensure_future(hold(first))
        await first.wait()
        waiting = asyncio.ensure_future(hold(second))  # max_num_seqs=1: this one queues
        await _wait_for(url, "sluice_requests_waiting", 1)

        response = await client.post("/v1/completions", json={**body, "stream": False})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"

        for task in (running, waiting):  # disconnecting aborts both
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        await _wait_for(url, "sluice_kv_blocks_used", 0)
        await _wait_for(url, "sluice_requests_waiting", 0)
        assert (
            await client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        ).status_code == 200


def test_sigterm_lets_running_requests_finish_then_exits_0(server):
    url = server.url
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 400, "stream": True, **NO_EOS}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=HEADERS, timeout=60) as response:
        lines = response.iter_lines()
        events.append(next(lines))
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # uvicorn notices the signal on its next tick and stops listening
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=5)
        events.extend(line for line in lines if line)
    assert events[-1] == "data: [DONE]"
    finishes = [line for line in events if '"finish_reason":"length"' in line]
    assert len(finishes) == 1  # the request ran to its full max_tokens through the drain
    assert server.wait(timeout=60) == 0


def test_streams_still_running_at_the_shutdown_timeout_end_with_an_error_event_then_done(model_dir_factory):
    """Not a body cut mid-way ("incomplete chunked read"): the client sees why the stream ended."""
    import json
    import threading

    from api.app import create_app
    from api.server import BackgroundServer
    from engine.async_llm import AsyncLLM

    engine = AsyncLLM(
        model=str(model_dir_factory("llama")),
        served_model_name=MODEL,
        device="cpu",
        num_kv_blocks=256,
        max_model_len=2048,
    )
    server = BackgroundServer(create_app(engine), shutdown_timeout=1.0).start()
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2000, "stream": True, **NO_EOS}
    stopper = threading.Thread(target=server.stop)
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events = [next(lines)]
            started = time.monotonic()
            stopper.start()  # as SIGTERM does: stop listening, wait for running requests
            events.extend(line for line in lines if line)
        assert time.monotonic() - started < 30  # ended at the timeout, not by running to max_tokens
    finally:
        stopper.join(60) if stopper.is_alive() else server.stop()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"
    assert not any('"finish_reason":"length"' in line for line in events)
    assert engine.stats()["kv_blocks_used"] == 0
