"""Failure paths of the engine fronts, checked without a model: the child's command loop (`_serve`)
driven over real pipes by a scripted engine, the parent's pipe handling, and the restart bound.
Every wait is bounded, so a regression fails here instead of hanging."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from types import SimpleNamespace

import pytest

from engine.async_llm import EngineDeadError, EngineStoppedError, RequestFailedError, StreamingEngineClient
from engine.engine_process import EngineProcess, RestartBudget, _serve
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling.sampling_params import SamplingParams

WAIT_S = 10


class ScriptedEngine:
    """LLMEngine's surface as `_serve` uses it. Prompts script validation: "explode" raises a
    RecursionError (as a deeply nested schema did), "slow" blocks until `release` is set; any other
    request finishes on the next step."""

    def __init__(self) -> None:
        self.requests: dict[str, SimpleNamespace] = {}
        self.release = threading.Event()
        self.validating = threading.Event()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def process_request(self, request_id: str, prompt: str, params: object) -> SimpleNamespace:
        if prompt == "explode":
            raise RecursionError("maximum recursion depth exceeded")
        if prompt == "slow":
            self.validating.set()
            self.release.wait(WAIT_S)
        return SimpleNamespace(request_id=request_id)

    def add_processed(self, user_request: SimpleNamespace) -> None:
        self.requests[user_request.request_id] = user_request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        if self.requests.pop(request_id, None) is None:
            return None
        return _output(request_id, "abort")

    def step(self) -> list[RequestOutput]:
        outputs = [_output(request_id, "length") for request_id in self.requests]
        self.requests.clear()
        return outputs

    def stats(self) -> dict[str, int]:
        return {"num_running": len(self.requests)}


def _output(request_id: str, finish_reason: str) -> RequestOutput:
    completion = CompletionOutput(index=0, text="x", token_ids=[1], finish_reason=finish_reason)
    return RequestOutput(request_id, "p", [1, 2], [completion], finished=True)


@pytest.fixture
def child():
    """`_serve` on a thread with a scripted engine, talking over real pipes as the child does."""
    engine = ScriptedEngine()
    commands_end, commands = multiprocessing.Pipe(duplex=False)
    results, results_end = multiprocessing.Pipe(duplex=False)
    thread = threading.Thread(target=_serve, args=(engine, commands_end, results_end), daemon=True)
    thread.start()
    yield SimpleNamespace(engine=engine, commands=commands, results=results, thread=thread)
    engine.release.set()
    if thread.is_alive():
        commands.send(("stop", None))
        thread.join(WAIT_S)


def _receive_until(results, wanted: set[str]) -> dict[str, object]:
    """What each wanted request got (an output's finish reason, or an error), reading for at most WAIT_S."""
    got: dict[str, object] = {}
    while not wanted <= got.keys():
        assert results.poll(WAIT_S), f"no message for {wanted - got.keys()} (the loop died or hangs)"
        kind, payload, _ = results.recv()
        for item in payload:
            if isinstance(item, tuple):
                got[item[0]] = item[1]
            else:
                got[item.request_id] = item.outputs[0].finish_reason
        if kind == "stopped":
            break
    return got


def test_an_unexpected_validation_error_fails_that_request_only(child):
    child.commands.send(("add", ("bad", "explode", None)))
    child.commands.send(("add", ("good", "fine", None)))
    got = _receive_until(child.results, {"bad", "good"})
    assert isinstance(got["bad"], RequestFailedError) and "RecursionError" in str(got["bad"])
    assert got["good"] == "length"
    child.commands.send(("add", ("after", "fine", None)))  # the loop still serves
    assert _receive_until(child.results, {"after"}) == {"after": "length"}


def test_stop_ends_requests_still_being_validated(child):
    child.commands.send(("add", ("slow", "slow", None)))
    assert child.engine.validating.wait(WAIT_S)
    child.commands.send(("stop", None))
    got = _receive_until(child.results, {"slow"})
    assert isinstance(got.get("slow"), EngineStoppedError), got
    child.thread.join(WAIT_S)
    assert not child.thread.is_alive()


def _process_front(commands) -> EngineProcess:
    """An EngineProcess's parent side around a given commands pipe, its child taken as alive."""
    front = EngineProcess.__new__(EngineProcess)
    StreamingEngineClient.__init__(front)
    front._send_lock = threading.Lock()
    front._accepting = True
    front._gave_up = False
    front._child = SimpleNamespace(commands=commands, process=SimpleNamespace(is_alive=lambda: True, pid=None))
    return front


async def test_cancelling_a_request_whose_engine_pipe_is_gone_raises_the_cancellation():
    receiving, sending = multiprocessing.Pipe(duplex=False)
    front = _process_front(sending)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in front.generate("Hi", SamplingParams(), "r1"):
            pass

    task = asyncio.ensure_future(consume())
    loop = asyncio.get_running_loop()
    loop.call_soon(started.set)
    await started.wait()
    assert receiving.poll(WAIT_S) and receiving.recv()[0] == "add"
    receiving.close()  # the child is gone: the next send fails with BrokenPipeError
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    with pytest.raises(EngineDeadError):  # and a new request is told why, not BrokenPipeError
        await front.generate("Hi", SamplingParams(), "r2").__anext__()


def test_restarts_are_bounded_per_window():
    budget = RestartBudget(2, window_s=60)
    assert budget.allow(0.0) and budget.allow(10.0)
    assert not budget.allow(20.0)  # a third death within the minute: give up
    assert budget.allow(60.5)  # the first restart left the window
    assert not RestartBudget(0).allow(0.0)
    with pytest.raises(ValueError, match="max_restarts_per_minute"):
        RestartBudget(-1)
