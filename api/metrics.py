"""Prometheus metrics: engine gauges read at scrape time, per-request counters and latency histograms."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

# fmt: off
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4, 0.8, 1.6,
                5.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
                    120.0)
# fmt: on


def read_engine_stats(engine: Any) -> dict[str, int]:
    """engine.stats(), read from the event loop while the engine thread mutates what it reads."""
    for _ in range(2):
        try:
            return engine.stats()
        except RuntimeError:
            # A read that races a step may see a dict change size; the next one sees it settled.
            continue
    return engine.stats()


class _EngineCollector(Collector):
    """Reads the engine's own counts at scrape time, so they can never drift from the truth."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            stats = read_engine_stats(self.engine)
        except Exception:  # a dead engine must not take /metrics down with it
            logger.exception("engine.stats() failed")
            return
        gauges = {
            # The engine schedules sequences: a request with n samples counts n times here.
            "sluice_requests_running": ("Sequences in the running batch.", "num_running"),
            "sluice_requests_waiting": ("Sequences waiting to be scheduled.", "num_waiting"),
            "sluice_kv_blocks_used": ("KV cache blocks in use.", "kv_blocks_used"),
            "sluice_kv_blocks_total": ("KV cache blocks in the pool.", "kv_blocks_total"),
        }
        for name, (doc, key) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        yield CounterMetricFamily(
            "sluice_preemptions",
            "Requests preempted for lack of KV blocks.",
            value=stats.get("num_preemptions", 0),
        )
        yield CounterMetricFamily(
            "sluice_engine_restarts",
            "Times the engine process died and was restarted.",
            value=getattr(self.engine, "num_restarts", 0),
        )


class ServerMetrics:
    """All metrics of one server, in a registry of its own (several apps may share a process)."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine))
        self.prompt_tokens = Counter(
            "sluice_prompt_tokens", "Prompt tokens of requests that started.", registry=self.registry
        )
        self.generation_tokens = Counter("sluice_generation_tokens", "Generated tokens.", registry=self.registry)
        self.requests = Counter(
            "sluice_requests",
            "Finished requests by finish reason.",
            ["finish_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "sluice_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "sluice_inter_token_latency_seconds",
            "Between successive outputs of a request.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "sluice_e2e_request_latency_seconds",
            "From request arrival to its last token.",
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "sluice_queue_time_seconds",
            "From request arrival until the engine first scheduled it.",
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        # Pre-create the usual label values so dashboards see zeros instead of missing series.
        for reason in ("stop", "length", "abort"):
            self.requests.labels(finish_reason=reason)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def tracker(self, arrival_time: float) -> RequestTracker:
        return RequestTracker(self, arrival_time)


class RequestTracker:
    """Turns one engine request's stream of outputs into metric observations."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float) -> None:
        self.metrics = metrics
        self.arrival_time = arrival_time
        self.last_output_time: float | None = None
        self.finish_reasons: dict[int, str] = {}
        self.done = False

    def on_output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        if self.last_output_time is None:
            self.metrics.prompt_tokens.inc(len(output.prompt_token_ids))
            self.metrics.ttft.observe(now - self.arrival_time)
            queue_time = output.queue_time
            if queue_time is not None:
                self.metrics.queue_time.observe(queue_time)
        elif new_tokens:
            self.metrics.itl.observe(now - self.last_output_time)
        if new_tokens:
            self.last_output_time = now
        self.metrics.generation_tokens.inc(new_tokens)
        for completion in output.outputs:
            if completion.finish_reason is not None:
                self.finish_reasons[completion.index] = completion.finish_reason
        if output.finished:
            self.finish(None)

    def finish(self, reason: str | None) -> None:
        """Counts the request once; `reason` overrides what the outputs said (e.g. 'abort')."""
        if self.done:
            return
        self.done = True
        if reason is None:
            # One label per request: an abort anywhere wins, then a truncation, then a clean stop.
            reasons = set(self.finish_reasons.values())
            reason = next((r for r in ("abort", "length", "stop") if r in reasons), "stop")
        self.metrics.requests.labels(finish_reason=reason).inc()
        self.metrics.e2e.observe(time.monotonic() - self.arrival_time)
