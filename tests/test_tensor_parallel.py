"""Tensor parallelism on the CPU (gloo): N processes give the tokens one process gives.

The oracle is the same engine at tensor_parallel_size=1 (itself held to transformers' `generate`
by test_engine_parity.py): greedy and seeded outputs must be equal token for token, however the
engine batched, chunked, cached, preempted or constrained them, with synchronous and asynchronous
scheduling. Every engine here starts real worker processes, so engines are shared across cases
(one tensor-parallel engine per process at a time: each is shut down before the next starts).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from shared_specs import SCHEMAS

from engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the gloo (CPU) path; on a GPU machine run it with CUDA_VISIBLE_DEVICES='' (tensor parallelism on "
    "CUDA needs one GPU per rank)",
)
# Workers inherit the environment: one intra-op thread each, as the test process (conftest) has.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).parents[1]
# A small pool and token budget, so that the same engines also preempt and chunk prompts.
ENGINE = {
    "device": "cpu",
    "dtype": "float32",
    "block_size": 16,
    "num_kv_blocks": 24,
    "max_num_batched_tokens": 64,
    "max_model_len": 384,
}
ARCHS = ["qwen3", "llama", "qwen2", "mistral"]
ASYNC_MODES = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
# Scheduling, caching, detokenizing and grammars do not depend on the architecture: one model covers them.
ONE_MODEL = pytest.mark.parametrize("engines", ["qwen3"], indirect=True)


def _prompts(count: int, lengths: range, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 1500) for _ in range(rng.choice(lengths))] for _ in range(count)]


def _run(llm: LLM, prompts, params, async_scheduling: bool):
    # The scheduling mode is read each step, so one engine serves both modes (nothing is in flight
    # between generate calls).
    llm.engine.async_scheduling = async_scheduling
    outputs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], "every KV block is freed"
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outputs]


def _start(model_dir: Path, tensor_parallel_size: int) -> LLM:
    return LLM(model=str(model_dir), tensor_parallel_size=tensor_parallel_size, **ENGINE)


def _stopped(llm: LLM) -> None:
    """Shuts an engine down and checks that none of its workers outlives it."""
    processes = list(llm.engine.parallel._workers.processes) if llm.engine.parallel else []
    llm.shutdown()
    assert all(p.poll() is not None for p in processes)


@pytest.fixture(scope="module", params=ARCHS)
def engines(request, model_dir_factory):
    """(TP=1, TP=2) engines on one tiny model; TP=2 engines of each architecture in turn, one after another."""
    model_dir = model_dir_factory(request.param)
    single = _start(model_dir, 1)
    sharded = _start(model_dir, 2)
    yield request.param, single, sharded
    _stopped(sharded)


@ASYNC_MODES
def test_greedy_and_seeded_outputs_equal_a_single_process(engines, async_scheduling):
    arch, single, sharded = engines
    prompts = _prompts(6, range(1, 40), seed=len(arch))
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)] * 3
    params += [SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=10) for i in range(3)]
    expected = _run(single, prompts, params, async_scheduling)
    assert _run(sharded, prompts, params, async_scheduling) == expected


@ASYNC_MODES
@ONE_MODEL
def test_preemption_chunked_prefill_and_n_samples_give_the_same_tokens(engines, async_scheduling):
    _, single, sharded = engines
    # 8 sequences of up to 100 prompt tokens plus 24 new ones need more than the pool's 24 blocks
    # (preemption), and prompts over 64 tokens take several steps (chunked prefill).
    prompts = _prompts(4, range(60, 100), seed=1)
    params = [SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)] * 2
    params += [SamplingParams(n=2, temperature=0.0, max_tokens=24, ignore_eos=True)] * 2
    preemptions = sharded.stats()["num_preemptions"]
    expected = _run(single, prompts, params, async_scheduling)
    assert _run(sharded, prompts, params, async_scheduling) == expected
    assert sharded.stats()["num_preemptions"] > preemptions


@ASYNC_MODES
@ONE_MODEL
def test_prefix_cache_hits_and_stop_strings_give_the_same_output(engines, async_scheduling):
    _, single, sharded = engines
    shared = _prompts(1, range(48, 49), seed=2)[0]
    prompts = [shared + tail for tail in _prompts(3, range(3, 9), seed=3)]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # The first prompt alone fills the cache with the shared prefix's 3 blocks; the batch reuses them.
    free_text = _run(single, prompts[:1], free, async_scheduling)
    assert _run(sharded, prompts[:1], free, async_scheduling) == free_text
    stop = free_text[0][0][1][4:7]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    hits = sharded.stats()["prefix_cache_hit_tokens"]
    expected = _run(single, prompts, params, async_scheduling)
    assert expected[0][0][2] == "stop"
    assert _run(sharded, prompts, params, async_scheduling) == expected
    assert sharded.stats()["prefix_cache_hit_tokens"] >= hits + 3 * 48


@ASYNC_MODES
@ONE_MODEL
def test_speculative_decoding_on_the_sharded_engine_gives_the_single_process_tokens(engines, async_scheduling):
    """Verification rows (1 + k per sequence, all sampled) reach the workers through the same step
    tensor; the n-gram proposer runs on rank 0 only. Attached to the running engine, to reuse its workers."""
    from engine.speculation.config import SpeculativeConfig
    from engine.speculation.speculator import Speculator

    _, single, sharded = engines
    engine = sharded.engine
    config = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3})
    engine.speculator = Speculator(config, engine.kv_cache)
    try:
        # Repeating prompts: the proposer finds continuations from the first step on.
        prompts = [p * 3 for p in _prompts(4, range(3, 8), seed=5)]
        params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)] * 2
        params += [SamplingParams(temperature=1.0, seed=i, max_tokens=16, ignore_eos=True) for i in range(2)]
        expected = _run(single, prompts, params, async_scheduling)
        assert _run(sharded, prompts, params, async_scheduling) == expected
        assert engine.speculator.num_accepted_tokens > 0
    finally:
        engine.speculator = None


@pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")
@ASYNC_MODES
@ONE_MODEL
def test_grammar_constrained_outputs_are_equal(engines, async_scheduling):
    from engine.sampling.structured_outputs import StructuredOutputsParams

    _, single, sharded = engines
    constraint = StructuredOutputsParams(json=SCHEMAS["enum"])
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=constraint)]
    params += [SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=constraint)]
    prompts = _prompts(2, range(4, 12), seed=4)
    expected = _run(single, prompts, params, async_scheduling)
    got = _run(sharded, prompts, params, async_scheduling)
    assert got == expected
    for (_, text, finish), *_ in got:
        assert finish == "stop" and json.loads(text)["color"] in ("red", "green", "blue")


def test_fused_kernels_merge_local_shards(model_dir_factory):
    """The Triton backend's fused gated MLP over each rank's own gate/up shards (interpreted here)."""
    single_params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = _prompts(1, range(5, 6), seed=5)
    model_dir = model_dir_factory("llama")
    single = LLM(model=str(model_dir), attention_backend="triton", **ENGINE)
    sharded = LLM(model=str(model_dir), attention_backend="triton", tensor_parallel_size=2, **ENGINE)
    try:
        mlp = sharded.engine.runner.model.model.layers[0].mlp
        assert hasattr(mlp, "sluice_gate_up_weight")  # installed, not fallen back
        assert mlp.sluice_gate_up_weight.shape[0] == mlp.gate_proj.weight.shape[0]  # two local halves
        assert _run(sharded, prompt, single_params, False) == _run(single, prompt, single_params, False)
    finally:
        _stopped(sharded)


# ---- four ranks, and a worker that dies ------------------------------------------------------


@pytest.fixture(scope="module")
def four_ranks(model_dir_factory):
    model_dir = model_dir_factory("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    single = _start(model_dir, 1)
    sharded = _start(model_dir, 4)
    yield single, sharded
    _stopped(sharded)


def test_four_ranks_on_four_kv_heads_match(four_ranks):
    single, sharded = four_ranks
    assert sharded.engine.runner.num_kv_heads == 1  # each rank caches its own KV head
    prompts = _prompts(4, range(1, 30), seed=6)
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)] * 2
    params += [SamplingParams(temperature=1.0, seed=9, max_tokens=8, ignore_eos=True)] * 2
    assert _run(sharded, prompts, params, True) == _run(single, prompts, params, True)


def test_a_worker_killed_mid_run_fails_the_engine_without_hanging(four_ranks):
    _, sharded = four_ranks
    engine = sharded.engine
    victim = engine.parallel._workers.processes[1]  # rank 2
    step = engine.step
    steps = 0

    def killing_step():
        nonlocal steps
        steps += 1
        if steps == 3:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
        return step()

    engine.step = killing_step
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        sharded.generate(_prompts(2, range(5, 10), seed=7), SamplingParams(max_tokens=200, ignore_eos=True))
    assert time.monotonic() - started < 30
    with pytest.raises(RuntimeError, match="rank 2"):  # and every later step says why at once
        engine.step()
    _stopped(sharded)  # the surviving ranks are stopped too


@pytest.mark.parametrize("size", [3, 4])
def test_a_size_that_does_not_divide_the_heads_is_refused_at_start(model_dir_factory, size):
    # The tiny models have 4 attention heads over 2 KV heads.
    with pytest.raises(ValueError, match=rf"'tensor_parallel_size': {size} does not divide the model's"):
        _start(model_dir_factory("qwen3"), size)


# ---- the server ----------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Distinct free ports below Linux's ephemeral range (32768-60999): the ports gloo, torchrun and the
    test's own connections are handed come from that range, so none of them can take these meanwhile."""
    ports: list[int] = []
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"not {count} free ports in 20000-32000")


SERVE_DEMO = ["-m", "api", "serve", "-tp", "2", "--model", "demo-random", "--device", "cpu"]
SERVE_DEMO += ["--num-kv-blocks", "64", "--max-model-len", "512", "--log-level", "info"]


class _Server:
    """A server process started in its own session, its stderr collected."""

    def __init__(self, command: list[str], port: int, signal_group: bool) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.signal_group = signal_group  # SIGTERM the whole group (torchrun's ranks), or the server alone
        self.process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def wait_until(self, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server: exit code {self.process.poll()}; log:\n{''.join(self.log)[-3000:]}")
            time.sleep(0.1)

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code
        except httpx.TransportError:
            return None

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already (a failed start)
            if self.signal_group:
                os.killpg(self.process.pid, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        """Waits for the process to end after `terminate` (killing it past 60 s), then kills what it left behind."""
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # and whatever of its session is left
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def _servers_boot_with_the_first_test(request):
    """Where the server tests are selected, their servers start with the module's first test: each boots
    in one single-threaded interpreter after another (server, engine process, worker; torchrun, its
    ranks), which then overlaps the in-process tests above, themselves waiting on a worker's start
    with a core idle much of the time."""
    selected = [item for item in request.session.items if item.module is request.module]
    if any("servers" in inspect.signature(item.function).parameters for item in selected):
        request.getfixturevalue("servers")


@pytest.fixture(scope="module")
def servers():
    """Both server tests' servers, started together (and early, above). Stopped at the module's end."""
    port, torchrun_port, master_port = _free_ports(3)
    started: dict[str, _Server] = {}
    try:
        started["tp2"] = _Server([sys.executable, *SERVE_DEMO, "--port", str(port)], port, signal_group=False)
        # The several-node launch, on one node: torchrun starts both ranks; rank 0 serves, its engine in
        # the server's process (one process less to start).
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0"]
        torchrun += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
        torchrun += [*SERVE_DEMO[1:], "--port", str(torchrun_port), "--no-engine-process"]
        started["torchrun"] = _Server(torchrun, torchrun_port, signal_group=True)  # it stops every rank it started
        yield started
    finally:
        for server in started.values():  # both drain at once
            server.terminate()
        for server in started.values():
            server.wait()


@pytest.mark.slow
def test_sluice_serve_tp2_serves_the_demo_model_and_a_dead_worker_turns_health_503(servers):
    openai = pytest.importorskip("openai")
    server = servers["tp2"]
    server.wait_until(lambda: server.health() == 200, timeout=180)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60)
    assert [m.id for m in client.models.list().data] == ["demo-random"]
    reply = client.chat.completions.create(
        model="demo-random", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1

    (worker_pid,) = [int(m) for m in re.findall(r"worker rank 1 started \(pid (\d+)\)", "".join(server.log))]
    stream = client.completions.create(
        model="demo-random", prompt="Hi", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    os.kill(worker_pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    server.wait_until(lambda: server.health() == 503, timeout=30)


@pytest.mark.slow
def test_torchrun_route_rank_0_serves_and_the_other_rank_works(servers):
    """The several-node launch, on one node: torchrun starts both ranks; rank 0 serves."""
    server = servers["torchrun"]
    server.wait_until(lambda: server.health() == 200, timeout=180)
    body = {"model": "demo-random", "prompt": "Hi", "max_tokens": 4, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    joined = "".join(server.log)
    assert "joined through torchrun's environment" in joined and "worker rank 1 of 2 ready" in joined
    assert "started (pid" not in joined  # torchrun started the worker, not the engine


def test_the_throughput_benchmark_runs_only_the_engine_when_sharded():
    from benchmarks.throughput import parse_args
    from benchmarks.workload import dummy_engine_config

    args = parse_args(["--preset", "cpu-small", "--tensor-parallel-size", "2"])
    assert args.systems == ["engine"] and args.no_roofline  # the baselines cannot join the workers' collectives
    assert dummy_engine_config(args, "model-dir").tensor_parallel_size == 2
