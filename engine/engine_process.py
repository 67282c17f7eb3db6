"""The engine's step loop in a child process, behind the same asyncio front as AsyncLLM.

In one process the HTTP side (JSON, SSE, uvicorn) and the step loop share the GIL, so every event
the server formats is time the loop cannot spend preparing the GPU's next step. Here the loop runs
in its own process: the server sends commands (add, abort, stop) over one pipe, and the child sends
back each step's outputs, with its stats, over another. Requests are validated in the child (a
ValueError comes back for that request alone); the tokenizer comes back pickled when the child is
ready, so the server tokenizes and renders chat templates itself.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

from engine.async_llm import EngineDeadError, StreamingEngineClient
from engine.config import EngineConfig
from engine.llm_engine import PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_HEALTH_CHECK_S = 1.0


class EngineProcess(StreamingEngineClient):
    """`AsyncLLM`'s interface, with the engine in a child process (started here; `close` stops it)."""

    def __init__(self, config: EngineConfig | None = None, start_timeout: float | None = None, **overrides: Any):
        super().__init__()
        config = config or EngineConfig(**overrides)
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        commands_end, self._commands = context.Pipe(duplex=False)  # (receiving end, sending end)
        self._results, results_end = context.Pipe(duplex=False)
        _grow_pipe(self._results)
        # The child logs as this process does (its KV-cache sizing, CUDA graphs, failures).
        log_level = logging.getLogger().getEffectiveLevel()
        self._process = context.Process(
            target=_engine_main,
            args=(config, commands_end, results_end, log_level),
            name="sluice-engine",
            daemon=True,
        )
        self._process.start()
        commands_end.close()
        results_end.close()
        self._send_lock = threading.Lock()
        if not self._results.poll(start_timeout):
            self._process.kill()
            raise RuntimeError(f"the engine process was not ready after {start_timeout} s")
        kind, info, stats = self._results.recv()
        if kind != "ready":
            self._process.join()
            raise RuntimeError(f"the engine process failed to start:\n{info}")
        self.tokenizer = info["tokenizer"]
        self.model_name = info["model_name"]
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self._stats: dict[str, int] = stats
        # Each request's prompt, sent by the child with its first output only (_without_repeated_prompts).
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}
        self._reader = threading.Thread(target=self._read, name="sluice-engine-results", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def is_alive(self) -> bool:
        return self._process.is_alive() and self._error is None and not self._stopping

    def stats(self) -> dict[str, int]:
        return self._stats  # as of the child's last message: it sends them after every step

    def close(self) -> None:
        """Stop the child; requests still in flight end with finish_reason 'abort'."""
        if not self._stopping:
            self._stopping = True
            try:
                self._submit("stop", None)
            except OSError:
                pass  # already gone
        self._reader.join(timeout=60)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    async def _prepare_add(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Any:
        return request_id, prompt, params  # validated in the child

    def _submit(self, command: str, payload: Any) -> None:
        with self._send_lock:
            self._commands.send((command, payload))

    def _read(self) -> None:
        """The results pipe to the event loop, until the child stops or dies."""
        try:
            while True:
                kind, payload, stats = self._results.recv()
                self._stats = stats
                if kind == "outputs":
                    self._hand_back(self._restore_prompts(payload))
                elif kind == "stopped":
                    self._hand_back(self._restore_prompts(payload))
                    return
                else:  # "died": the loop raised; its traceback is the payload
                    logger.error("engine process failed:\n%s", payload)
                    self._fail_all(EngineDeadError("the engine process failed"))
                    return
        except (EOFError, OSError):
            if not self._stopping:
                logger.error("engine process exited (code %s)", self._process.exitcode)
                self._fail_all(EngineDeadError("the engine process exited"))
        except Exception:  # a message this side cannot read: no stream may wait forever
            logger.exception("reading the engine process's results failed")
            self._fail_all(EngineDeadError("the engine process's results could not be read"))

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
            if not future.done():
                continue
            del validating[request_id]
            try:
                engine.add_processed(future.result())
            except ValueError as error:
                outputs.append((request_id, error))
        if stopping:
            outputs.extend(filter(None, (engine.abort_request(rid) for rid in list(engine.requests))))
            results.send(("stopped", _without_repeated_prompts(outputs, reported), engine.stats()))
            validator.shutdown(wait=False, cancel_futures=True)
            return
        if engine.has_unfinished_requests():
            outputs.extend(engine.step())
        results.send(("outputs", _without_repeated_prompts(outputs, reported), engine.stats()))


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
