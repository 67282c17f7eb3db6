"""The engine's step loop in a child process, behind the same asyncio front as AsyncLLM.

In one process the HTTP side (JSON, SSE, uvicorn) and the step loop share the GIL, so every event
the server formats is time the loop cannot spend preparing the GPU's next step. Here the loop runs
in its own process: the server sends commands (add, abort, stop) over one pipe, and the child sends
back each step's outputs, with its stats, over another. Requests are validated in the child (an
error comes back for that request alone); the tokenizer comes back pickled when the child is
ready, so the server tokenizes and renders chat templates itself.

Engine death has one signal: the results pipe ends (EOF, or a "died" message when the loop raised).
Whatever dies under the engine (the child, or a worker process it runs) must end the child, which
closes that pipe. The reader thread then fails every request in flight with EngineDeadError,
starts a new child (at most `max_restarts_per_minute` times in any 60 s) and serves again; past the
bound it gives up, and `failed_for_good` tells the server to exit so a supervisor takes over.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from engine.async_llm import (
    EngineDeadError,
    EngineStoppedError,
    StreamingEngineClient,
    request_failed,
)
from engine.config import EngineConfig
from engine.llm_engine import PromptType
from engine.outputs import RequestOutput
from engine.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_HEALTH_CHECK_S = 1.0
RESTART_WINDOW_S = 60.0


@dataclass
class _Child:
    process: BaseProcess
    commands: Connection  # sending end
    results: Connection  # receiving end
    info: dict[str, Any]
    stats: dict[str, Any]  # LLMEngine.stats(): ints, and lists of ints per speculative position


class RestartBudget:
    """At most `max_restarts` restarts in any `window_s` seconds (a crash loop is a supervisor's job)."""

    def __init__(self, max_restarts: int, window_s: float = RESTART_WINDOW_S) -> None:
        if max_restarts < 0:
            raise ValueError(f"Invalid value for 'max_restarts_per_minute': must be >= 0, got {max_restarts}")
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        """Whether one more restart fits; if so, it is counted."""
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True


class EngineProcess(StreamingEngineClient):
    """`AsyncLLM`'s interface, with the engine in a child process (started here, restarted here when
    it dies, stopped by `close`)."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        start_timeout: float | None = None,
        max_restarts_per_minute: int = 3,
        **overrides: Any,
    ):
        super().__init__()
        self._config = config or EngineConfig(**overrides)
        self._start_timeout = start_timeout
        self._restart_budget = RestartBudget(max_restarts_per_minute)
        self.num_restarts = 0
        self._gave_up = False
        # Guards the commands pipe, `_accepting` (False while no live child reads commands) and `_stopping`.
        self._send_lock = threading.Lock()
        self._child = _start_child(self._config, start_timeout)
        self._accepting = True
        info = self._child.info
        self.tokenizer = info["tokenizer"]
        self.model_name = info["model_name"]
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self._stats: dict[str, Any] = self._child.stats
        # Each request's prompt, sent by the child with its first output only (_without_repeated_prompts).
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}
        self._reader = threading.Thread(target=self._supervise, name="sluice-engine-results", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._child.process.pid

    @property
    def _process(self) -> BaseProcess:
        return self._child.process

    @property
    def is_alive(self) -> bool:
        return self._child.process.is_alive() and self._error is None and not self._stopping

    @property
    def is_restarting(self) -> bool:
        return self._error is not None and not self._stopping and not self._gave_up

    @property
    def failed_for_good(self) -> bool:
        return self._gave_up and not self._stopping

    def stats(self) -> dict[str, Any]:
        return self._stats  # as of the child's last message: it sends them after every step

    def close(self) -> None:
        """Stop the child; requests still in flight end with finish_reason 'abort' (those still being
        validated with EngineStoppedError)."""
        with self._send_lock:
            if not self._stopping:
                self._stopping = True
                if self._accepting:
                    try:
                        self._commands_pipe.send(("stop", None))
                    except OSError:
                        pass  # already gone: the reader sees the pipe end
            self._accepting = False
        self._reader.join(timeout=60)
        process = self._child.process
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()

    @property
    def _commands_pipe(self) -> Connection:
        return self._child.commands

    async def _prepare_add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Any:
        return request_id, prompt, params  # validated in the child

    def _submit(self, command: str, payload: Any) -> None:
        with self._send_lock:
            if not self._accepting:
                raise EngineDeadError("the engine process is not running")
            try:
                self._commands_pipe.send((command, payload))
            except OSError as error:  # it died and the reader has not noticed yet
                raise EngineDeadError("the engine process is gone") from error

    # ---- the reader thread: results to the event loop, restarts ---------------------------------

    def _supervise(self) -> None:
        while True:
            child = self._child
            if self._read(child):
                return  # stopped
            # The child is dead (or unreadable): no request in flight can finish.
            with self._send_lock:
                self._accepting = False
            self._stats = _idle_stats(self._stats)
            self._prompts.clear()
            self._fail_all(EngineDeadError("the engine process died"))
            _reap(child.process)
            died_at = time.monotonic()
            if self._stopping:
                return
            if not self._restart_budget.allow(died_at):
                logger.error(
                    "the engine process died after %d restart(s) in the last %.0f s: not restarting it",
                    self._restart_budget.max_restarts,
                    RESTART_WINDOW_S,
                )
                self._gave_up = True
                return
            logger.warning("restarting the engine process")
            try:
                new_child = _start_child(self._config, self._start_timeout)
            except Exception:
                logger.exception("restarting the engine process failed")
                self._gave_up = True
                return
            self.num_restarts += 1
            with self._send_lock:
                self._child = new_child
                self._stats = new_child.stats
                if self._stopping:  # close() ran during the restart: stop the new child too
                    new_child.commands.send(("stop", None))
                    continue
            # After the failure above has reached every stream (the event loop runs callbacks in order).
            self._call_on_loop(self._revive, or_now=True)
            logger.warning(
                "engine process restarted in %.1f s (pid %s; %d restarts so far)",
                time.monotonic() - died_at,
                new_child.process.pid,
                self.num_restarts,
            )

    def _revive(self) -> None:
        with self._send_lock:
            if self._stopping:
                return
            self._accepting = True
            self._error = None

    def _read(self, child: _Child) -> bool:
        """The results pipe to the event loop until the child stops (True) or dies (False)."""
        try:
            while True:
                kind, payload, stats = child.results.recv()
                self._stats = stats
                if kind == "outputs":
                    self._hand_back(self._restore_prompts(payload))
                elif kind == "stopped":
                    self._hand_back(self._restore_prompts(payload))
                    self._fail_all(EngineStoppedError("the engine was stopped"))  # anything left
                    return True
                else:  # "died": the loop raised; its traceback is the payload
                    logger.error("engine process failed:\n%s", payload)
                    return False
        except (EOFError, OSError):
            if self._stopping:
                self._fail_all(EngineStoppedError("the engine was stopped"))
                return True
            logger.error("engine process exited (code %s)", _exit_code(child.process))
            return False
        except Exception:  # a message this side cannot read: no stream may wait forever
            logger.exception("reading the engine process's results failed")
            return False

    def _restore_prompts(self, outputs: list) -> list:
        for output in outputs:
            if not isinstance(output, RequestOutput):
                continue
            if output.prompt_token_ids is None:
                output.prompt, output.prompt_token_ids = self._prompts[output.request_id]
            else:
                self._prompts[output.request_id] = (output.prompt, output.prompt_token_ids)
            if output.finished:
                del self._prompts[output.request_id]
        return outputs


def _start_child(config: EngineConfig, start_timeout: float | None) -> _Child:
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    commands_end, commands = context.Pipe(duplex=False)  # (receiving end, sending end)
    results, results_end = context.Pipe(duplex=False)
    _grow_pipe(results)
    # The child logs as this process does (its KV-cache sizing, CUDA graphs, failures).
    log_level = logging.getLogger().getEffectiveLevel()
    process = context.Process(
        target=_engine_main,
        args=(config, commands_end, results_end, log_level),
        name="sluice-engine",
        daemon=True,
    )
    process.start()
    commands_end.close()
    results_end.close()
    try:
        if not results.poll(start_timeout):
            raise RuntimeError(f"the engine process was not ready after {start_timeout} s")
        kind, info, stats = results.recv()
    except (EOFError, OSError) as error:
        _reap(process)
        raise RuntimeError(f"the engine process exited while starting (code {_exit_code(process)})") from error
    except BaseException:
        _reap(process)
        raise
    if kind != "ready":
        _reap(process)
        raise RuntimeError(f"the engine process failed to start:\n{info}")
    return _Child(process, commands, results, info, stats)


def _reap(process: BaseProcess) -> None:
    """Makes sure a child that is done (or must be) is gone, leaving no zombie."""
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()


def _exit_code(process: BaseProcess) -> int | None:
    process.join(timeout=1)  # the pipe can end a moment before the exit status is there
    return process.exitcode


def _idle_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """A dead engine runs nothing and holds no block; the pool's size stays what it was. Counters
    start again from zero, as the new child's will; a per-position list keeps its length."""

    def idle(key: str, value: Any) -> Any:
        if key == "kv_blocks_total":
            return value
        return [0] * len(value) if isinstance(value, list) else 0

    return {key: idle(key, value) for key, value in stats.items()}


def _grow_pipe(connection: Connection) -> None:
    """A 1 MiB pipe buffer (Linux; the default is 64 KiB): a step's outputs for 256 requests are
    ~20 KB, and a child that fills the buffer while this process is busy would stall its loop."""
    try:
        import fcntl

        fcntl.fcntl(connection.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass  # another OS, or a capped /proc/sys/fs/pipe-max-size: the default buffer works, just less slack


# ---- the child ---------------------------------------------------------------------------------


def _engine_main(config: EngineConfig, commands: Connection, results: Connection, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    # Ctrl-C (and a group-wide SIGTERM) reaches the child too; the server decides when the engine
    # stops, draining first. If the server dies instead, the closed pipe ends the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException:
        results.send(("failed", traceback.format_exc(), {}))
        return
    info = {
        "tokenizer": engine.tokenizer,
        "model_name": engine.model_name,
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
    }
    results.send(("ready", info, engine.stats()))
    try:
        _serve(engine, commands, results)
    except BaseException:
        results.send(("died", traceback.format_exc(), engine.stats()))
    finally:
        engine.shutdown()  # stops tensor-parallel workers


def _serve(engine: Any, commands: Connection, results: Connection) -> None:
    # Validation (and a grammar's compilation, which can take a second) runs beside the step loop.
    validator = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-validate")
    validating: dict[str, concurrent.futures.Future] = {}
    reported: set[str] = set()  # requests whose prompt went with an earlier output
    while True:
        idle = not engine.has_unfinished_requests() and not validating
        stopping = False
        outputs: list = []
        if idle:  # nothing to do until a command comes; meanwhile a dead TP worker must still show
            while not commands.poll(_IDLE_HEALTH_CHECK_S):
                engine.check_health()
        # Block for a command only when there is nothing else to do.
        while commands.poll(None if idle else 0):
            command, payload = commands.recv()
            idle = False
            if command == "add":
                request_id, prompt, params = payload
                validating[request_id] = validator.submit(engine.process_request, request_id, prompt, params)
            elif command == "abort":
                if validating.pop(payload, None) is None:
                    aborted = engine.abort_request(payload)
                    if aborted is not None:
                        outputs.append(aborted)
            else:
                stopping = True
        if validating and not engine.has_unfinished_requests() and not outputs:
            # Nothing to step: wait for a validation (or, shortly, for the next command).
            concurrent.futures.wait(validating.values(), timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
        for request_id, future in list(validating.items()):
            if future.done():
                del validating[request_id]
                outputs.extend(_add_validated(engine, request_id, future))
        if stopping:
            outputs.extend(filter(None, (engine.abort_request(rid) for rid in list(engine.requests))))
            # Requests still being validated never reached the engine: they end here, not never.
            stopped = EngineStoppedError("the engine was stopped before the request started")
            outputs.extend((request_id, stopped) for request_id in validating)
            results.send(("stopped", _without_repeated_prompts(outputs, reported), engine.stats()))
            validator.shutdown(wait=False, cancel_futures=True)
            return
        if engine.has_unfinished_requests():
            outputs.extend(engine.step())
        results.send(("outputs", _without_repeated_prompts(outputs, reported), engine.stats()))


def _add_validated(engine: Any, request_id: str, future: concurrent.futures.Future) -> list:
    """Adds a validated request. Any failure (of validation or of adding) fails that request alone,
    as (request_id, error) with an error that pickles: a ValueError's text, or RequestFailedError."""
    try:
        engine.add_processed(future.result())
    except ValueError as error:
        return [(request_id, ValueError(str(error)))]
    except Exception as error:
        logger.exception("request %r failed in validation", request_id)
        engine.abort_request(request_id)  # whatever part of it got in
        return [(request_id, request_failed(request_id, error))]
    return []


def _without_repeated_prompts(outputs: list, reported: set[str]) -> list:
    """Sends each request's prompt with its first output only: pickling 256 prompts of ~500 ids on
    every step would cost several milliseconds a step on each side. The parent puts them back."""
    for output in outputs:
        if not isinstance(output, RequestOutput):
            continue
        if output.request_id in reported:
            output.prompt, output.prompt_token_ids = None, None
        if output.finished:
            reported.discard(output.request_id)
        elif output.prompt_token_ids is not None:
            reported.add(output.request_id)
    return outputs
