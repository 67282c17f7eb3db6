"""--max-waiting-requests counts what waits: requests (not sequences) the engine cannot start yet."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from api.app import create_app
from api.server import BackgroundServer
from engine.async_llm import AsyncLLM
from engine.config import EngineConfig

MODEL = "tiny-admission"
NO_EOS = {"ignore_eos": True}


@contextlib.contextmanager
def _serve(model_dir_factory, max_waiting_requests: int, **settings):
    config = EngineConfig(model=str(model_dir_factory("llama")), served_model_name=MODEL, device="cpu", **settings)
    app = create_app(AsyncLLM(config), max_waiting_requests=max_waiting_requests)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def roomy(model_dir_factory):
    with _serve(model_dir_factory, 8, num_kv_blocks=256, max_model_len=512) as running:
        yield running


def _chat(max_tokens: int = 2, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, **extra}


async def test_an_idle_server_answers_a_whole_burst_that_fits(roomy):
    # 32 tiny requests, a limit of 8 waiting, 256 sequence slots: none of them ever waits.
    async with httpx.AsyncClient(base_url=roomy.url, timeout=120) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=_chat()) for _ in range(32)))
    assert [r.status_code for r in responses] == [200] * 32


async def test_an_n16_request_counts_as_one_request(model_dir_factory):
    # 4 sequence slots: an n=16 request keeps 12 of its sequences queued, yet it is one request,
    # so with a limit of 8 the requests behind it wait their turn instead of being refused.
    with _serve(model_dir_factory, 8, max_num_seqs=4, num_kv_blocks=256, max_model_len=512) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = asyncio.Event()

            async def hold() -> None:
                body = _chat(30, n=16, stream=True, **NO_EOS)
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_lines():
                        started.set()

            holder = asyncio.ensure_future(hold())
            await asyncio.wait_for(started.wait(), 60)
            responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=_chat()) for _ in range(3)))
            await asyncio.wait_for(holder, 120)
    assert [r.status_code for r in responses] == [200] * 3


async def test_a_request_that_can_never_fit_is_a_400_even_when_the_queue_is_full(model_dir_factory):
    # One sequence slot, nothing may wait, 8 blocks of 16 tokens: the slot is taken below.
    with _serve(model_dir_factory, 0, max_num_seqs=1, num_kv_blocks=8, max_model_len=256) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = asyncio.Event()

            async def hold() -> None:
                body = {"model": MODEL, "prompt": "Hi", "max_tokens": 100, "stream": True, **NO_EOS}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        started.set()

            holder = asyncio.ensure_future(hold())
            await asyncio.wait_for(started.wait(), 60)
            too_long = await client.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 300})
            too_many_blocks = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": [5] * 100, "max_tokens": 100}
            )
            fits_but_full = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_many_blocks.status_code == 400 and too_many_blocks.json()["error"]["param"] == "max_tokens"
    assert fits_but_full.status_code == 429 and "retry-after" in fits_but_full.headers
