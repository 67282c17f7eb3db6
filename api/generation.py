"""Running engine requests for a handler: errors before the response starts, aborts on disconnect.

A handler must know a request is valid before it sends a 200 (a prompt that is too long is a 400,
not an error in the middle of an event stream), so `open_stream` waits for the engine's first output
before returning. Every path out (finished, client gone, handler cancelled) closes the engine's
generator, which aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from api.admission import Admission
from api.errors import APIError, bad_request_from_value_error
from api.metrics import RequestTracker, ServerMetrics
from engine.async_llm import EngineDeadError
from engine.outputs import RequestOutput
from engine.sampling.sampling_params import SamplingParams

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody is left to answer."""


class EngineStream:
    """One engine request whose first output has arrived; iterate it for that output and the rest."""

    def __init__(
        self,
        generator: AsyncIterator[RequestOutput],
        first: RequestOutput,
        tracker: RequestTracker,
        on_close: Callable[[], None],
    ) -> None:
        self._generator = generator
        self._first: RequestOutput | None = first
        self._tracker = tracker
        self._on_close: Callable[[], None] | None = on_close
        self.prompt_token_ids = first.prompt_token_ids
        self.num_cached_tokens = first.num_cached_tokens  # prompt tokens the prefix cache served
        self.finished = first.finished

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        if self.finished:
            return
        async for output in self._generator:
            self._tracker.on_output(output)
            self.finished = output.finished
            yield output
            if output.finished:
                return

    async def aclose(self) -> None:
        """Idempotent; aborts the engine request if it is still running."""
        if self._on_close is None:
            return
        on_close, self._on_close = self._on_close, None
        try:
            # Shielded: this runs in `finally` blocks of cancelled tasks, and an abort that is
            # itself cancelled would leave the request holding KV blocks with nobody reading it.
            with anyio.CancelScope(shield=True):
                await self._generator.aclose()  # type: ignore[attr-defined]
        finally:
            if not self.finished:
                self._tracker.finish("abort")
            on_close()


async def open_stream(
    engine: Any,
    prompt: list[int],
    params: SamplingParams,
    *,
    metrics: ServerMetrics,
    admission: Admission,
    arrival_time: float,
    request_id: str | None = None,
    prompt_param: str = "messages",
    param_renames: Mapping[str, str] | None = None,
) -> EngineStream:
    """Starts an engine request and waits for its first output; engine ValueErrors become 400s.

    `param_renames` maps the engine's parameter names in those errors to the request's own.
    """
    admission.check_fits(len(prompt), params.max_tokens, prompt_param)
    admission.admit()
    request_id = request_id or uuid.uuid4().hex
    generator = engine.generate(prompt, params, request_id)
    tracker = metrics.tracker(arrival_time)
    try:
        first = await generator.__anext__()
    except BaseException as error:
        with anyio.CancelScope(shield=True):
            await generator.aclose()
        admission.release()
        if isinstance(error, ValueError):
            raise bad_request_from_value_error(error, default_param=prompt_param, renames=param_renames) from None
        if isinstance(error, StopAsyncIteration):
            raise RuntimeError("the engine ended a request without any output") from None
        if isinstance(error, EngineDeadError):
            raise APIError(503, "The inference engine is not running.", code="engine_dead") from None
        raise
    tracker.on_output(first)
    return EngineStream(generator, first, tracker, on_close=admission.release)


async def open_streams(
    engine: Any,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    metrics: ServerMetrics,
    admission: Admission,
    arrival_time: float,
    prompt_param: str,
    param_renames: Mapping[str, str] | None = None,
) -> list[EngineStream]:
    """Opens one stream per prompt concurrently; if any fails, the others are closed again."""
    base_id = uuid.uuid4().hex
    tasks = [
        asyncio.ensure_future(
            open_stream(
                engine,
                prompt,
                params,
                metrics=metrics,
                admission=admission,
                arrival_time=arrival_time,
                request_id=f"{base_id}-{i}",
                prompt_param=prompt_param,
                param_renames=param_renames,
            )
        )
        for i, prompt in enumerate(prompts)
    ]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, EngineStream):
                    await result.aclose()
        raise
    return [task.result() for task in tasks]


async def close_all(streams: list[EngineStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def merge_streams(streams: list[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        # The common case needs no tasks: a direct loop adds no latency per token.
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(position: int, stream: EngineStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((position, output))
        except Exception as error:  # re-raised by the consumer, which owns the response
            queue.put_nowait((position, error))
            return
        queue.put_nowait((position, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            position, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client disconnects.

    Starlette only watches for disconnects while it streams a body; before that (and for the
    whole of a non-streamed completion) nothing would notice a client that gave up.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()


async def _wait_for_disconnect(request: Request) -> None:
    # After the body has been read, the next ASGI message is the disconnect (uvicorn sends it when
    # the socket closes), so this blocks without polling.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())
