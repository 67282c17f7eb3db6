"""Running the app under uvicorn: in the foreground with a SIGTERM drain, or on a background thread."""

from __future__ import annotations

import signal
import socket
import threading
import time
from types import FrameType, TracebackType

import uvicorn
from fastapi import FastAPI

from api.app import start_draining


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: the first exit signal flips the app into draining mode (503s)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        start_draining(self._app)
        super().handle_exit(sig, frame)


def serve(app: FastAPI, *, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
    """Serves until SIGTERM/SIGINT; SIGTERM waits up to `shutdown_timeout` s for running requests."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
        # Streams end when the engine says so; a keep-alive timeout shorter than a generation
        # would not cut them, but idle keep-alives should not pin a draining server.
        timeout_keep_alive=5,
    )
    server = DrainingServer(config, app)
    # uvicorn re-raises the signal it caught once it has shut down, to let the previous handler
    # act; with the default SIGTERM handler that would kill the process with -15 after a clean
    # drain. Exiting normally is the contract: a drained server exits 0.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


class BackgroundServer:
    """Serves an app on a free loopback port from a thread (tests, benchmarks, notebooks).

    with BackgroundServer(app) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key=...)
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        # Binding here, before the thread starts, hands uvicorn a socket that is already ours:
        # no window in which another process could take a port we picked as free.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        self.server = DrainingServer(config, app)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
