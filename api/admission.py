"""Who gets in: refuses new requests while draining (503) or when the waiting queue is full (429)."""

from __future__ import annotations

from typing import Any

from api.errors import APIError
from api.metrics import read_engine_stats

RETRY_AFTER_S = 1  # the queue turns over in about a decode step per request; 1 s is the HTTP minimum


class Admission:
    """Counts the requests this server has handed to the engine and not yet seen finish."""

    def __init__(self, engine: Any, max_waiting_requests: int | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"Invalid value for 'max_waiting_requests': must be >= 0, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.draining = False
        self.num_active = 0  # engine requests admitted and not yet released

    def start_draining(self) -> None:
        self.draining = True

    def num_waiting(self) -> int:
        """Requests queued and not yet running.

        The engine's own count lags: a request handed to the loop thread is only counted once the
        thread picks it up, so a burst would all see a short queue. Requests this server admitted
        beyond those the engine runs are waiting too, whichever count is higher wins.
        """
        stats = read_engine_stats(self.engine)
        return max(int(stats.get("num_waiting", 0)), self.num_active - int(stats.get("num_running", 0)))

    def admit(self, num_requests: int = 1) -> None:
        """Raises the 503/429 APIError, or counts `num_requests` engine requests as active."""
        if self.draining:
            raise APIError(503, "The server is shutting down and accepts no new requests.", code="shutting_down")
        if not self.engine.is_alive:
            raise APIError(503, "The inference engine is not running.", code="engine_dead")
        if self.max_waiting_requests is not None and self.num_waiting() + num_requests > self.max_waiting_requests:
            raise APIError(
                429,
                f"The server's waiting queue is full ({self.max_waiting_requests} requests); retry later.",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.num_active += num_requests

    def release(self, num_requests: int = 1) -> None:
        self.num_active -= num_requests
        assert self.num_active >= 0, "released more requests than admitted"
