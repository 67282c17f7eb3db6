"""Running the app under uvicorn: in the foreground with a SIGTERM drain, or on a background thread."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from types import FrameType, TracebackType

import uvicorn
from fastapi import FastAPI

from api.app import start_draining
from engine.async_llm import EngineStoppedError

logger = logging.getLogger(__name__)


# Between the shutdown timeout, when the server ends the streams still running (error event, then
# [DONE]), and uvicorn cutting whatever connection is left: time to flush those last events.
STREAM_END_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: the first exit signal flips the app into draining mode (503s); at
    `shutdown_timeout` the requests still running are ended properly (a stream gets an error event
    and [DONE], a plain request a 503) before uvicorn cuts connections; and an engine that failed
    for good stops the server with `exit_code` 1, so that a supervisor restarts it."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        # uvicorn's own cut comes a little later: it would end a stream mid-body.
        config.timeout_graceful_shutdown = shutdown_timeout + STREAM_END_GRACE_S
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        start_draining(self._app)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        engine = self._app.state.sluice.engine
        if self.exit_code == 0 and getattr(engine, "failed_for_good", False):
            logger.error("The engine failed and will not be restarted: stopping the server (exit code 1)")
            self.exit_code = 1
            start_draining(self._app)
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        cut = asyncio.get_running_loop().call_later(self._shutdown_timeout, self._end_running_requests)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    def _end_running_requests(self) -> None:
        engine = self._app.state.sluice.engine
        ended = engine.fail_all_requests(EngineStoppedError("the server's shutdown timeout expired"))
        if ended:
            logger.warning(
                "Shutdown timeout (%.1f s) expired: ended %d running request(s)", self._shutdown_timeout, ended
            )


def serve(app: FastAPI, *, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> int:
    """Serves until SIGTERM/SIGINT; SIGTERM waits up to `shutdown_timeout` s for running requests.

    Returns the process's exit code: 0 after a drain, 1 when the engine failed for good."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # Streams end when the engine says so; a keep-alive timeout shorter than a generation
        # would not cut them, but idle keep-alives should not pin a draining server.
        timeout_keep_alive=5,
    )
    server = DrainingServer(config, app, shutdown_timeout)
    # uvicorn re-raises the signal it caught once it has shut down, to let the previous handler
    # act; with the default SIGTERM handler that would kill the process with -15 after a clean
    # drain. Exiting normally is the contract: a drained server exits 0.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    except SystemExit as stop:
        if not server.started:  # uvicorn could not start (its port taken): its own non-zero status
            return stop.code if isinstance(stop.code, int) else 1
        return server.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return server.exit_code


def _exit_cleanly(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


class BackgroundServer:
    """Serves an app on a free loopback port from a thread (tests, benchmarks, notebooks).

    with BackgroundServer(app) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key=...)
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning", shutdown_timeout: float = 5.0
    ) -> None:
        self.app = app
        self.host = host
        # Binding here, before the thread starts, hands uvicorn a socket that is already ours:
        # no window in which another process could take a port we picked as free.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level)
        self.server = DrainingServer(config, app, shutdown_timeout)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def exited(self) -> bool:
        """The server has stopped serving (asked to, or by itself: a dead engine; see `exit_code`)."""
        return self._thread.ident is not None and not self._thread.is_alive()

    @property
    def exit_code(self) -> int:
        return self.server.exit_code

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
