"""Who gets in: refuses new requests while draining (503), that can never fit (400), or when the
waiting queue is full (429)."""

from __future__ import annotations

import sys
from typing import Any

from api.errors import APIError, bad_request_from_value_error
from api.metrics import read_engine_stats
from engine.llm_engine import check_request_fits

RETRY_AFTER_S = 1  # the queue turns over in about a decode step per request; 1 s is the HTTP minimum


class Admission:
    """Counts the requests this server has handed to the engine and not yet seen finish.

    `max_waiting_requests` bounds the requests that wait for the engine to start them; requests
    are counted, not sequences (an n=16 request is one). What waits is the engine's queue plus the
    requests handed over since its last report (still being validated, or not yet seen in its
    counts) beyond the sequence slots it has free: on an idle engine a burst that fits never waits.
    """

    def __init__(self, engine: Any, max_waiting_requests: int | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"Invalid value for 'max_waiting_requests': must be >= 0, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.draining = False
        self.num_active = 0  # engine requests admitted and not yet released

    def start_draining(self) -> None:
        self.draining = True

    def num_waiting(self, num_new: int = 0) -> int:
        """Requests that wait (with `num_new` more handed over now)."""
        stats = read_engine_stats(self.engine)
        queued = int(stats.get("num_waiting_requests", stats.get("num_waiting", 0)))
        # Admitted requests the engine's last report does not hold yet (an overestimate by those it
        # finished and this server has not released yet, which only makes admission stricter).
        in_transit = max(0, self.num_active - int(stats.get("num_requests", 0))) + num_new
        # Without the engine's slot count (an engine that does not report it), nothing is free.
        num_sequences = int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))
        free_slots = int(stats.get("max_num_seqs", 0)) - num_sequences
        return queued + max(0, in_transit - max(0, free_slots))

    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> None:
        """A 400 for a request that no amount of waiting would let run (checked before the queue:
        a 429 would tell a client to retry what can never succeed)."""
        stats = read_engine_stats(self.engine)
        max_model_len = self.engine.max_model_len
        if max_tokens is None:
            max_tokens = max(1, max_model_len - num_prompt_tokens)
        try:
            check_request_fits(
                num_prompt_tokens,
                max_tokens,
                max_model_len=max_model_len,
                # An engine that reports no pool (a dead one's reset gauges) is judged by length only.
                num_kv_blocks=int(stats.get("kv_blocks_total") or sys.maxsize),
                block_size=int(stats.get("kv_block_size") or 1),
            )
        except ValueError as error:
            raise bad_request_from_value_error(error, default_param=prompt_param) from None

    def admit(self, num_requests: int = 1) -> None:
        """Raises the 503/429 APIError, or counts `num_requests` engine requests as active."""
        if self.draining:
            raise APIError(503, "The server is shutting down and accepts no new requests.", code="shutting_down")
        if not self.engine.is_alive:
            raise APIError(503, "The inference engine is not running.", code="engine_dead")
        if self.max_waiting_requests is not None and self.num_waiting(num_requests) > self.max_waiting_requests:
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
