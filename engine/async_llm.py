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
from engine.sampling.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine is gone (its loop thread, its process, or a process under it): the request cannot
    finish. Callers may retry once the engine is alive again."""


class EngineStoppedError(EngineDeadError):
    """The engine was stopped (`close()`, or a server at its shutdown timeout) before the request finished."""


class RequestFailedError(RuntimeError):
    """Preparing one request failed inside the engine in an unexpected way (not a ValueError about its
    input). Only that request fails; the engine carries on."""


def request_failed(request_id: str, error: BaseException) -> RequestFailedError:
    """What a front hands back for a request whose preparation raised something other than ValueError.

    Plain text only: the original may not survive pickling across the engine process's pipe."""
    return RequestFailedError(f"request {request_id!r} failed in the engine: {type(error).__name__}: {error}")


class StreamingEngineClient:
    """The event-loop side shared by the engine fronts: one asyncio.Queue per request, filled from
    the engine's side with `_hand_back`, read (and coalesced) by `generate`.

    A front provides `_prepare_add` (what an "add" command carries), `_submit`, `is_alive`,
    `stats` and `close`, and sets tokenizer, model_name, max_model_len and vocab_size.

    Invariant that keeps every stream finite: `_submit` raises EngineDeadError once the engine side
    can no longer take a command (stopped or dead), and before that, failing the engine runs
    `_fail_streams` on the event loop. `generate` registers its stream and submits "add" without an
    `await` in between, so the failure either finds the stream registered or came first, and then
    the submit (or the `is_alive` check before it) refuses.
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

    @property
    def failed_for_good(self) -> bool:
        """The engine is dead and nothing will bring it back: the server should exit (non-zero)."""
        return self._error is not None and not self._stopping

    def stats(self) -> dict[str, int | list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def _prepare_add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Any:
        raise NotImplementedError

    def _submit(self, command: str, payload: Any) -> None:
        """Sends a command to the engine side; raises EngineDeadError if it can take none."""
        raise NotImplementedError

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as the engine produces them; closing the generator aborts it.

        Raises ValueError for a request the engine refuses, RequestFailedError for one whose
        preparation failed otherwise, and EngineDeadError (EngineStoppedError) when the engine dies
        (is stopped) before the request finishes.
        """
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        payload = await self._prepare_add(request_id, prompt, params)
        if request_id in self._streams:
            raise ValueError(f"Invalid value for 'request_id': {request_id!r} is already running")
        # The engine may have failed, or been stopped, while the request was being prepared.
        if not self.is_alive:
            raise EngineDeadError("the engine stopped while the request was being prepared")
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            self._submit("add", payload)  # no await since the stream was registered: see the class invariant
        except BaseException:
            del self._streams[request_id]
            raise
        finished = False
        held: Any = None  # an item taken from the queue while coalescing, not yet handled
        try:
            while not finished:
                output, held = (held, None) if held is not None else (await queue.get(), None)
                if isinstance(output, BaseException):
                    raise _fresh(output)
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
                try:
                    self._submit("abort", request_id)
                except EngineDeadError:
                    pass  # nothing left to abort, and the caller's own exception must win

    async def abort(self, request_id: str) -> None:
        try:
            self._submit("abort", request_id)
        except EngineDeadError:
            pass  # a dead engine holds no request

    def fail_all_requests(self, error: EngineDeadError) -> int:
        """From the event loop: every request in flight raises `error` (a copy) in its generate(),
        which aborts it in the engine; returns how many. The server calls this when its shutdown
        timeout expires."""
        self._fail_streams(error)
        return len(self._streams)

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
        if outputs:
            self._call_on_loop(self._deliver, outputs, or_now=False)

    def _fail_all(self, error: EngineDeadError) -> None:
        """From any thread, after `_submit` has started refusing: fails every stream registered by
        the time the event loop gets to it (a snapshot taken here could miss one being registered)."""
        self._error = error
        self._call_on_loop(self._fail_streams, error, or_now=False)

    def _fail_streams(self, error: BaseException) -> None:
        for queue in self._streams.values():
            queue.put_nowait(error)

    def _call_on_loop(self, callback: Any, *args: Any, or_now: bool) -> None:
        """Runs `callback` on the event loop the streams live on, after what is already queued there;
        with no usable loop, now (`or_now`) or never (no loop: no stream can be waiting)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(callback, *args)
                return
            except RuntimeError:
                pass  # closed in the meantime
        if or_now:
            callback(*args)


def _fresh(error: BaseException) -> BaseException:
    """A copy of an error delivered to several streams: raising one instance in many coroutines
    would chain their tracebacks together."""
    try:
        return type(error)(*error.args)
    except Exception:
        return error


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
        self._accepting = True  # guarded by _wakeup; False once the loop thread reads no more commands
        self._thread = threading.Thread(target=self._run, name="sluice-engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopping

    def stats(self) -> dict[str, int | list[int]]:
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
        try:
            return await asyncio.to_thread(self.engine.process_request, request_id, prompt, params)
        except ValueError:
            raise
        except Exception as error:
            logger.exception("preparing request %r failed", request_id)
            raise request_failed(request_id, error) from error

    def _submit(self, command: str, payload: Any) -> None:
        with self._wakeup:
            if not self._accepting:
                raise EngineDeadError("the engine loop is not running")
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
                    # Commands after this batch would never be read: from now on _submit refuses.
                    self._accepting = not stopping
                outputs: list = []
                for command, payload in commands:
                    if command == "add":
                        outputs.extend(_add(engine, payload))
                    else:
                        aborted = engine.abort_request(payload)
                        if aborted is not None:
                            outputs.append(aborted)
                if stopping:
                    outputs.extend(filter(None, (engine.abort_request(rid) for rid in list(engine.requests))))
                    self._hand_back(outputs)
                    # Every request the engine held ended above; nothing else may still wait.
                    self._fail_all(EngineStoppedError("the engine was stopped"))
                    return
                if engine.has_unfinished_requests():
                    outputs.extend(engine.step())
                self._hand_back(outputs)
        except BaseException as error:  # a bug, not a request's input: fail every stream loudly
            logger.exception("engine loop failed")
            with self._wakeup:
                self._accepting = False
            self._fail_all(EngineDeadError(f"the engine loop failed: {type(error).__name__}: {error}"))


def _add(engine: LLMEngine, user_request: Any) -> list:
    """Adds a prepared request; a failure fails that request alone (as (request_id, error))."""
    try:
        engine.add_processed(user_request)
    except ValueError as error:
        return [(user_request.request_id, error)]
    except Exception as error:
        logger.exception("adding request %r failed", user_request.request_id)
        engine.abort_request(user_request.request_id)  # whatever part of it got in
        return [(user_request.request_id, request_failed(user_request.request_id, error))]
    return []
