"""asyncio fronts of the engine: one output stream per request, the step loop elsewhere.

`StreamingEngineClient` is the event-loop side both fronts share. `AsyncLLM` (here) runs the step
loop on a thread of this process; `engine.engine_process.EngineProcess` runs it in a child
process (what the server uses). Client coroutines never run engine code that touches the device:
they hand the request to the loop (validated and tokenized first, in a worker thread, so a long
prompt or a grammar compile never stalls the event loop) and await their own asyncio.Queue. The
loop steps the engine and hands each step's outputs back to the event loop in one call, so the
GPU never waits on HTTP and HTTP never waits on the GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput, merge_delta_outputs
from engine.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class StreamingEngineClient:
    """The event-loop side shared by the engine fronts: one asyncio.Queue per request, filled from
    the engine's side with `_hand_back`, read (and coalesced) by `generate`.

    A front provides `_prepare_add` (what an "add" command carries), `_submit`, `is_alive`,
    `stats` and `close`, and sets tokenizer, model_name, max_model_len and vocab_size.
    """

    tokenizer: Any
    model_name: str
    max_model_len: int
    vocab_size: int

    def __init__(self) -> None:
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._error: BaseException | None = None

    @property
    def is_alive(self) -> bool:
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def _prepare_add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Any:
        raise NotImplementedError

    def _submit(self, command: str, payload: Any) -> None:
        raise NotImplementedError

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as the engine produces them; closing the generator aborts it."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        payload = await self._prepare_add(request_id, prompt, params)
        if request_id in self._streams:
            raise ValueError(f"Invalid value for 'request_id': {request_id!r} is already running")
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._submit("add", payload)
        finished = False
        held: Any = None  # an item taken from the queue while coalescing, not yet handled
        try:
            while not finished:
                output, held = (held, None) if held is not None else (await queue.get(), None)
                if isinstance(output, ValueError):
                    raise output
                if isinstance(output, BaseException):
                    raise EngineDeadError("the engine loop failed") from output
                # A consumer that fell behind (a slow client, a busy event loop) gets everything that
                # piled up as one output: one SSE event instead of one per step.
                while not output.finished and not queue.empty():
                    later = queue.get_nowait()
                    if not isinstance(later, RequestOutput):
                        held = later
                        break
                    output = merge_delta_outputs(output, later) if params.output_kind == OutputKind.DELTA else later
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def _deliver(self, outputs: list[RequestOutput | tuple[str, BaseException]]) -> None:
        for output in outputs:
            if isinstance(output, tuple):
                request_id, error = output
                queue = self._streams.get(request_id)
                if queue is not None:
                    queue.put_nowait(error)
                continue
            queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _hand_back(self, outputs: list) -> None:
        """From any thread: queue outputs (and per-request errors) for their streams."""
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _fail_all(self, error: BaseException) -> None:
        self._error = error
        self._hand_back([(rid, error) for rid in list(self._streams)])


class AsyncLLM(StreamingEngineClient):
    """The engine in this process, its step loop on its own thread."""

    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or EngineConfig(**overrides)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size
        self._commands: list[tuple[str, Any]] = []
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sluice-engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopping

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    def close(self) -> None:
        """Stop the loop thread; requests still in flight end with finish_reason 'abort'."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()
        self.engine.shutdown()

    async def _prepare_add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Any:
        # Tokenizing a long prompt or compiling a grammar takes milliseconds to seconds: off the event loop.
        return await asyncio.to_thread(self.engine.process_request, request_id, prompt, params)

    def _submit(self, command: str, payload: Any) -> None:
        with self._wakeup:
            self._commands.append((command, payload))
            self._wakeup.notify()

    # ---- engine side (loop thread) -----------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wakeup:
                    while not self._commands and not engine.has_unfinished_requests() and not self._stopping:
                        self._wakeup.wait(timeout=1.0)
                        engine.check_health()  # a dead tensor-parallel worker shows while idle too
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                outputs: list = []
                for command, payload in commands:
                    if command == "add":
                        try:
                            engine.add_processed(payload)
                        except ValueError as error:
                            outputs.append((payload.request_id, error))
                    else:
                        aborted = engine.abort_request(payload)
                        if aborted is not None:
                            outputs.append(aborted)
                if stopping:
                    outputs.extend(filter(None, (engine.abort_request(rid) for rid in list(engine.requests))))
                    self._hand_back(outputs)
                    return
                if engine.has_unfinished_requests():
                    outputs.extend(engine.step())
                self._hand_back(outputs)
        except BaseException as error:  # a bug, not a request's input: fail every stream loudly
            logger.exception("engine loop failed")
            self._fail_all(error)
