"""Prometheus metrics: engine gauges read at scrape time, per-request counters and latency histograms.

Two sets carry the same series: vLLM's names (`vllm:num_requests_running`, ...), so that dashboards,
alerts and autoscalers built for vLLM work unchanged, and the same under our own `sluice:` prefix,
with vLLM's suffixes, units, histogram buckets and labels (`model_name`, `engine`), so that moving a
dashboard to ours is a prefix swap. Requests count as requests: an n=16 request is one. The older
`sluice_*` series (underscore names) stay for existing dashboards.
"""

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
# vLLM's buckets (vllm/v1/metrics/loggers.py): 22 for TTFT, 19 per token, 21 for request phases.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0)
# fmt: on
# The prefixes of the vLLM-shaped sets; the label names are vLLM's. One engine per server: engine="0".
VLLM_PREFIXES = ("vllm:", "sluice:")
LABELS = ("model_name", "engine")
ENGINE_INDEX = "0"
# vLLM's FinishReason values, pre-created so dashboards see zeros instead of missing series.
FINISH_REASONS = ("stop", "length", "abort")
# vLLM's speculative-decoding counters (vllm/v1/spec_decode/metrics.py): (name, engine stats key, help).
# Exported only by an engine that speculates, as vLLM does. Acceptance rate: rate(accepted) /
# rate(draft_tokens); mean acceptance length: 1 + rate(accepted) / rate(drafts).
SPEC_DECODE_COUNTERS = (
    ("spec_decode_num_drafts", "spec_num_drafts", "Number of spec decoding drafts."),
    ("spec_decode_num_draft_tokens", "spec_num_draft_tokens", "Number of draft tokens."),
    ("spec_decode_num_accepted_tokens", "spec_num_accepted_tokens", "Number of accepted tokens."),
)


def read_engine_stats(engine: Any) -> dict[str, Any]:
    """engine.stats(), read from the event loop while the engine thread mutates what it reads.

    Values are ints, except the per-position speculative-decoding counts (lists of ints)."""
    for _ in range(2):
        try:
            return engine.stats()
        except RuntimeError:
            # A read that races a step may see a dict change size; the next one sees it settled.
            continue
    return engine.stats()


class _EngineCollector(Collector):
    """Reads the engine's own counts at scrape time, so they can never drift from the truth."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.labels = [model_name, ENGINE_INDEX]

    def collect(self) -> Iterator[Metric]:
        try:
            stats = read_engine_stats(self.engine)
        except Exception:  # a dead engine must not take /metrics down with it
            logger.exception("engine.stats() failed")
            return
        # Requests, not sequences (an engine without the request counts reports sequences).
        running = stats.get("num_running_requests", stats.get("num_running", 0))
        waiting = stats.get("num_waiting_requests", stats.get("num_waiting", 0))
        total_blocks = stats.get("kv_blocks_total", 0)
        kv_usage = stats.get("kv_blocks_used", 0) / total_blocks if total_blocks else 0.0
        gauges = {
            "sluice_requests_running": ("Requests with a sequence in the running batch.", running),
            "sluice_requests_waiting": ("Requests waiting to be scheduled.", waiting),
            "sluice_kv_blocks_used": ("KV cache blocks in use.", stats.get("kv_blocks_used", 0)),
            "sluice_kv_blocks_total": ("KV cache blocks in the pool.", total_blocks),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        preemptions = stats.get("num_preemptions", 0)
        yield CounterMetricFamily("sluice_preemptions", "Requests preempted for lack of KV blocks.", value=preemptions)
        for prefix in VLLM_PREFIXES:
            for name, doc, value in (
                ("num_requests_running", "Number of requests in model execution batches.", running),
                ("num_requests_waiting", "Number of requests waiting to be processed.", waiting),
                ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage),
            ):
                gauge = GaugeMetricFamily(prefix + name, doc, labels=LABELS)
                gauge.add_metric(self.labels, value)
                yield gauge
            counter = CounterMetricFamily(
                prefix + "num_preemptions", "Cumulative number of preemption from the engine.", labels=LABELS
            )
            counter.add_metric(self.labels, preemptions)
            yield counter
            yield from self._spec_decode_counters(prefix, stats)
        yield CounterMetricFamily(
            "sluice_engine_restarts",
            "Times the engine process died and was restarted.",
            value=getattr(self.engine, "num_restarts", 0),
        )
        drafted_per_pos = stats.get("spec_num_draft_tokens_per_pos")
        if drafted_per_pos is not None:
            # Ours (vLLM has no such series): n-gram drafts can be shorter than num_speculative_tokens,
            # so position j's acceptance rate is accepted_per_pos[j] / this, not / drafts.
            counter = CounterMetricFamily(
                "sluice_spec_decode_num_draft_tokens_per_pos", "Draft tokens per draft position.", labels=["position"]
            )
            for position, value in enumerate(drafted_per_pos):
                counter.add_metric([str(position)], value)
            yield counter

    def _spec_decode_counters(self, prefix: str, stats: dict[str, Any]) -> Iterator[Metric]:
        for name, key, doc in SPEC_DECODE_COUNTERS:
            if key in stats:
                counter = CounterMetricFamily(prefix + name, doc, labels=LABELS)
                counter.add_metric(self.labels, stats[key])
                yield counter
        accepted_per_pos = stats.get("spec_num_accepted_tokens_per_pos")
        if accepted_per_pos is not None:
            counter = CounterMetricFamily(
                prefix + "spec_decode_num_accepted_tokens_per_pos",
                "Accepted tokens per draft position.",
                labels=[*LABELS, "position"],
            )
            for position, value in enumerate(accepted_per_pos):
                counter.add_metric([*self.labels, str(position)], value)
            yield counter


class ServerMetrics:
    """All metrics of one server, in a registry of its own (several apps may share a process)."""

    def __init__(self, engine: Any, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, model_name or getattr(engine, "model_name", "")))
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
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)
        self.vllm_sets = [
            VLLMRequestMetrics(prefix, [model_name or getattr(engine, "model_name", ""), ENGINE_INDEX], self.registry)
            for prefix in VLLM_PREFIXES
        ]

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def tracker(self, arrival_time: float) -> RequestTracker:
        return RequestTracker(self, arrival_time)


class VLLMRequestMetrics:
    """The per-request series of vLLM's set under one prefix, for one model_name/engine label pair."""

    def __init__(self, prefix: str, labels: list[str], registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(prefix + name, doc, LABELS, registry=registry).labels(*labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(prefix + name, doc, LABELS, buckets=buckets, registry=registry).labels(*labels)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        success = Counter(
            prefix + "request_success",
            "Count of successfully processed requests.",
            [*LABELS, "finished_reason"],
            registry=registry,
        )
        self.request_success = {reason: success.labels(*labels, reason) for reason in FINISH_REASONS}
        self.ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", VLLM_TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", VLLM_ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", VLLM_REQUEST_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", VLLM_REQUEST_BUCKETS
        )


class RequestTracker:
    """Turns one engine request's stream of outputs into metric observations."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float) -> None:
        self.metrics = metrics
        self.arrival_time = arrival_time
        self.last_output_time: float | None = None
        self.sample_output_times: dict[int, float] = {}  # each sample's last output with tokens
        self.finish_reasons: dict[int, str] = {}
        self.done = False

    def on_output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        vllm_sets = self.metrics.vllm_sets
        if self.last_output_time is None:
            num_prompt = len(output.prompt_token_ids)
            self.metrics.prompt_tokens.inc(num_prompt)
            self.metrics.ttft.observe(now - self.arrival_time)
            queue_time = output.queue_time
            if queue_time is not None:
                self.metrics.queue_time.observe(queue_time)
            for family in vllm_sets:
                family.prompt_tokens.inc(num_prompt)
                family.ttft.observe(now - self.arrival_time)
                # Per request, as the usage's cached_tokens: its prompt looked up, what the cache served.
                family.prefix_cache_queries.inc(num_prompt)
                family.prefix_cache_hits.inc(output.num_cached_tokens)
                if queue_time is not None:
                    family.queue_time.observe(queue_time)
        elif new_tokens:
            self.metrics.itl.observe(now - self.last_output_time)
        self._observe_token_intervals(output, now)
        if new_tokens:
            self.last_output_time = now
        self.metrics.generation_tokens.inc(new_tokens)
        for family in vllm_sets:
            family.generation_tokens.inc(new_tokens)
        for completion in output.outputs:
            if completion.finish_reason is not None:
                self.finish_reasons[completion.index] = completion.finish_reason
        if output.finished:
            self.finish(None)

    def _observe_token_intervals(self, output: RequestOutput, now: float) -> None:
        """vLLM's inter_token_latency: one observation per token of a sequence after its first.

        An output that brings k tokens of a sample (outputs merged while the client read slowly)
        counts k intervals of equal share, so _sum / _count stays the mean. A sample's first output
        (a sibling of n > 1 may start later) is timed from the request's previous output, or from its
        arrival for the request's very first output (whose extra tokens' spacing is otherwise unknown):
        the count is exact, those few values are estimates. Runs before last_output_time moves to now.
        """
        for completion in output.outputs:
            num_tokens = len(completion.token_ids)
            if not num_tokens:
                continue
            last = self.sample_output_times.get(completion.index)
            self.sample_output_times[completion.index] = now
            num_intervals = num_tokens
            if last is None:  # the sample's first token starts its sequence: no interval before it
                last, num_intervals = self.last_output_time or self.arrival_time, num_tokens - 1
            if not num_intervals:
                continue
            interval = (now - last) / num_tokens
            for family in self.metrics.vllm_sets:
                for _ in range(num_intervals):
                    family.itl.observe(interval)

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
        e2e = time.monotonic() - self.arrival_time
        self.metrics.e2e.observe(e2e)
        for family in self.metrics.vllm_sets:
            success = family.request_success.get(reason)
            if success is not None:
                success.inc()
            family.e2e.observe(e2e)
