"""/metrics for dashboards built for vLLM: vLLM's series, names, buckets and labels, and the same under
`sluice:`, requests counted as requests."""

from __future__ import annotations

import re
from types import SimpleNamespace

import openai
import pytest
from metrics_scrape import scrape

from api.metrics import ServerMetrics
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling.sampling_params import SamplingParams

MODEL = "tiny-metrics"
# vLLM's (vllm/v1/metrics/loggers.py), written out here as the spec.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]  # fmt: skip
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
EXPECTED = {
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge",
    "prefix_cache_queries": "counter",
    "prefix_cache_hits": "counter",
    "num_preemptions": "counter",
    "prompt_tokens": "counter",
    "generation_tokens": "counter",
    "request_success": "counter",
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
}


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    with serve_tiny_model(MODEL, num_kv_blocks=256, max_model_len=512) as running:
        yield running


def _scrape(server) -> tuple[str, dict[tuple[str, frozenset], float]]:
    return scrape(server.url)


def _value(samples, name: str, **labels: str) -> float:
    wanted = {(k, f'"{v}"') for k, v in {"model_name": MODEL, "engine": "0", **labels}.items()}
    (value,) = [v for (n, ls), v in samples.items() if n == name and ls == wanted]
    return value


@pytest.mark.parametrize("prefix", ["vllm:", "sluice:"])
def test_vllms_series_are_exported_with_its_types_and_labels(server, prefix):
    text, samples = _scrape(server)
    for name, kind in EXPECTED.items():
        exposed = f"{name}_total" if kind == "counter" else name  # prometheus_client's text format, as vLLM's
        assert f"# TYPE {prefix}{exposed} {kind}" in text
    for name in ("num_requests_running", "kv_cache_usage_perc", "num_preemptions_total", "prompt_tokens_total"):
        _value(samples, prefix + name)  # exactly one series, labelled model_name and engine
    for reason in ("stop", "length", "abort"):
        _value(samples, prefix + "request_success_total", finished_reason=reason)


@pytest.mark.parametrize(
    ("name", "buckets"),
    [
        ("time_to_first_token_seconds", TTFT_BUCKETS),
        ("inter_token_latency_seconds", ITL_BUCKETS),
        ("e2e_request_latency_seconds", REQUEST_BUCKETS),
        ("request_queue_time_seconds", REQUEST_BUCKETS),
    ],
)
def test_histograms_have_vllms_buckets(server, name, buckets):
    text, _ = _scrape(server)
    for prefix in ("vllm:", "sluice:"):
        found = re.findall(rf'^{prefix}{name}_bucket\{{[^}}]*le="([^"]+)"', text, flags=re.M)
        assert [float(le) for le in found] == [*buckets, float("inf")]


def test_moving_a_dashboard_is_a_prefix_swap(server):
    _, samples = _scrape(server)
    vllm = {(name.removeprefix("vllm:"), labels) for name, labels in samples if name.startswith("vllm:")}
    ours = {(name.removeprefix("sluice:"), labels) for name, labels in samples if name.startswith("sluice:")}
    assert vllm == ours and len(vllm) > 20


def test_a_request_with_n_samples_counts_once(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "The quick brown fox jumps over the lazy dog, twice over: the quick brown fox."
    _, before = _scrape(server)
    response = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=4, extra_body={"ignore_eos": True})
    _, after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    for prefix in ("vllm:", "sluice:"):
        assert delta(prefix + "request_success_total", finished_reason="length") == 1
        assert delta(prefix + "generation_tokens_total") == 12
        assert delta(prefix + "prompt_tokens_total") == response.usage.prompt_tokens
        assert delta(prefix + "prefix_cache_queries_total") == response.usage.prompt_tokens
        assert delta(prefix + "prefix_cache_hits_total") == response.usage.prompt_tokens_details.cached_tokens
        assert delta(prefix + "time_to_first_token_seconds_count") == 1
        assert delta(prefix + "inter_token_latency_seconds_count") == 3 * 3  # tokens 2, 3 and 4 of each sample
        assert delta(prefix + "e2e_request_latency_seconds_count") == 1


def test_running_and_waiting_count_requests_not_sequences(model_dir_factory):
    config = EngineConfig(
        model=str(model_dir_factory()), device="cpu", num_kv_blocks=64, max_model_len=128, enable_prefix_caching=False
    )
    engine = LLMEngine(config)
    engine.add_request("n4", [5, 6, 7, 8], SamplingParams(n=4, max_tokens=8, ignore_eos=True))
    engine.add_request("n1", [9, 10, 11], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    stats = engine.stats()
    assert stats["num_running"] == 5  # sequences
    assert (stats["num_running_requests"], stats["num_waiting_requests"]) == (2, 0)


def test_kv_cache_usage_is_the_fraction_of_blocks_in_use():
    stats = {"kv_blocks_used": 30, "kv_blocks_total": 120, "num_running_requests": 2, "num_waiting_requests": 7}
    metrics = ServerMetrics(SimpleNamespace(stats=lambda: stats, model_name="m"))
    text = metrics.render()[0].decode()
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25' in text
    assert 'sluice:num_requests_waiting{engine="0",model_name="m"} 7.0' in text
    assert 'vllm:num_requests_running{engine="0",model_name="m"} 2.0' in text
