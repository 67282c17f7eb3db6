"""AsyncLLM: streamed outputs as they are sampled, aborts that free blocks, concurrent requests."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from engine import LLM, AsyncLLM, OutputKind, SamplingParams
from engine.async_llm import EngineDeadError, RequestFailedError

WAIT_S = 20  # every wait below is bounded: a request that never ends fails the test, not CI


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("llama")


@pytest.fixture(scope="module")
def async_llm(model_dir):
    engine = AsyncLLM(model=str(model_dir), device="cpu", max_model_len=512, num_kv_blocks=128)
    yield engine
    engine.close()


def _idle(engine: AsyncLLM) -> bool:
    stats = engine.stats()
    return stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


async def _wait_idle(engine: AsyncLLM) -> None:
    for _ in range(200):
        if _idle(engine):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


async def test_stream_deltas_concatenate_to_the_offline_result(async_llm, model_dir):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=24, n=2, output_kind=OutputKind.DELTA)
    texts, ids, finishes, steps = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}, 0
    async for out in async_llm.generate("Grüße 🚀", params, "stream-1"):
        steps += 1
        for completion in out.outputs:
            texts[completion.index] += completion.text
            ids[completion.index] += completion.token_ids
            if completion.finish_reason:
                finishes[completion.index].append(completion.finish_reason)
    assert steps > 2  # tokens arrived step by step, not all at the end
    assert finishes == {0: ["length"], 1: ["length"]}  # exactly one finish per sample
    offline = LLM(model=str(model_dir), device="cpu", max_model_len=512, num_kv_blocks=128)
    (expected,) = offline.generate("Grüße 🚀", SamplingParams(temperature=1.0, seed=5, max_tokens=24, n=2))
    for completion in expected.outputs:
        assert ids[completion.index] == completion.token_ids
        assert texts[completion.index] == completion.text
    await _wait_idle(async_llm)


async def test_a_consumer_that_falls_behind_gets_what_piled_up_in_one_output(async_llm, model_dir):
    params = SamplingParams(temperature=1.0, seed=8, max_tokens=30, n=2, logprobs=2, output_kind=OutputKind.DELTA)
    texts, ids, logprobs, outputs = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}, 0
    async for out in async_llm.generate("Slow reader", params, "slow-1"):
        outputs += 1
        for completion in out.outputs:
            texts[completion.index] += completion.text
            ids[completion.index] += completion.token_ids
            logprobs[completion.index] += [entry.token_id for entry in completion.logprobs]
        await asyncio.sleep(0.3)  # several engine steps pass between reads
    assert outputs < 30  # coalesced: fewer outputs than tokens
    offline = LLM(model=str(model_dir), device="cpu", max_model_len=512, num_kv_blocks=128)
    (expected,) = offline.generate("Slow reader", dataclasses.replace(params, output_kind=OutputKind.CUMULATIVE))
    for completion in expected.outputs:
        assert ids[completion.index] == completion.token_ids
        assert texts[completion.index] == completion.text
        assert logprobs[completion.index] == completion.token_ids  # one logprob entry per token, in order
    await _wait_idle(async_llm)


async def test_closing_the_stream_aborts_and_frees_blocks(async_llm):
    params = SamplingParams(max_tokens=400, ignore_eos=True, output_kind=OutputKind.DELTA)
    stream = async_llm.generate(list(range(20, 80)), params, "to-abort")
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            assert async_llm.stats()["kv_blocks_used"] > 0
            break
    await stream.aclose()
    await _wait_idle(async_llm)


async def test_concurrent_streams_each_get_their_own_max_tokens(async_llm):
    async def run(i: int) -> int:
        params = SamplingParams(max_tokens=5 + i, ignore_eos=True, output_kind=OutputKind.DELTA)
        count = 0
        async for out in async_llm.generate(f"request {i} ✓", params, f"conc-{i}"):
            count += len(out.outputs[0].token_ids) if out.outputs else 0
        return count

    counts = await asyncio.gather(*(run(i) for i in range(12)))
    assert counts == [5 + i for i in range(12)]
    await _wait_idle(async_llm)


async def test_invalid_request_raises_before_streaming_and_engine_keeps_serving(async_llm):
    with pytest.raises(ValueError, match="maximum context length is 512"):
        async for _ in async_llm.generate(list(range(500)), SamplingParams(max_tokens=100), "too-long"):
            pass
    async for out in async_llm.generate("still alive", SamplingParams(max_tokens=2), "after-error"):
        last = out
    assert last.finished and async_llm.is_alive


@pytest.fixture
def fresh_async_llm(model_dir):
    """An engine of its own, for tests that stop or break it."""
    engine = AsyncLLM(model=str(model_dir), device="cpu", max_model_len=512, num_kv_blocks=64)
    yield engine
    engine.close()


def _hold_preparation(engine: AsyncLLM, prompt: str) -> tuple[threading.Event, threading.Event]:
    """Makes preparing `prompt` (tokenizing, compiling a grammar) wait: (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    original = engine.engine.process_request

    def process_request(request_id, prompt_, params):
        if prompt_ == prompt:
            entered.set()
            release.wait(WAIT_S)
        return original(request_id, prompt_, params)

    engine.engine.process_request = process_request
    return entered, release


async def _run(engine: AsyncLLM, prompt: str, request_id: str, max_tokens: int = 3) -> str | None:
    last = None
    async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_id):
        last = out
    return last.outputs[0].finish_reason if last else None


async def test_a_request_being_prepared_when_close_runs_ends(fresh_async_llm):
    entered, release = _hold_preparation(fresh_async_llm, "slow")
    request = asyncio.ensure_future(_run(fresh_async_llm, "slow", "slow-1"))
    assert await asyncio.to_thread(entered.wait, WAIT_S)
    await asyncio.to_thread(fresh_async_llm.close)
    release.set()
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(request, WAIT_S)


async def test_a_request_being_prepared_when_the_loop_dies_ends(fresh_async_llm):
    entered, release = _hold_preparation(fresh_async_llm, "slow")

    def broken_step():
        raise RuntimeError("injected failure")

    fresh_async_llm.engine.step = broken_step
    slow = asyncio.ensure_future(_run(fresh_async_llm, "slow", "slow-2"))
    assert await asyncio.to_thread(entered.wait, WAIT_S)
    with pytest.raises(EngineDeadError):  # the loop dies on this one's step
        await asyncio.wait_for(_run(fresh_async_llm, "Hi", "dies"), WAIT_S)
    release.set()
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(slow, WAIT_S)
    assert not fresh_async_llm.is_alive and fresh_async_llm.failed_for_good


async def test_an_unexpected_error_adding_a_request_fails_only_that_request(fresh_async_llm):
    original = fresh_async_llm.engine.add_processed

    def add_processed(user_request):
        if user_request.request_id == "bad":
            raise TypeError("injected failure")
        original(user_request)

    fresh_async_llm.engine.add_processed = add_processed
    with pytest.raises(RequestFailedError, match="TypeError: injected failure"):
        await asyncio.wait_for(_run(fresh_async_llm, "Hi", "bad"), WAIT_S)
    assert await asyncio.wait_for(_run(fresh_async_llm, "Hi", "good"), WAIT_S) == "length"
    assert fresh_async_llm.is_alive
    await _wait_idle(fresh_async_llm)
