"""The benchmark scripts run end to end on a tiny workload (their numbers are not asserted)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks import profile_step, report, serving, speculative, structured_cost, throughput
from benchmarks.workload import REPO_ROOT, make_workload
from engine.models.demo_model import demo_model_path


def _small_box_for_transformers_continuous_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, transformers sizes its continuous-batching cache and attention masks from the machine's
    RAM: on a CI box that is gigabytes, filled before the first request (20 s and more of this test, none
    of it timed by the benchmark). 1 GiB stands in for a smaller box; the baseline runs as it otherwise
    would. (Only where this transformers has the memory handler; elsewhere it keeps its own sizing.)"""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler
    except ImportError:
        return
    if hasattr(PagedAttentionMemoryHandler, "get_available_memory"):
        monkeypatch.setattr(PagedAttentionMemoryHandler, "get_available_memory", lambda self: 1 << 30)


def test_throughput_runs_every_system_on_the_same_workload(tmp_path, monkeypatch):
    _small_box_for_transformers_continuous_batching(monkeypatch)
    out = tmp_path / "throughput.json"
    argv = ["--preset", "cpu-small", "--num-seqs", "4", "--max-input", "24", "--min-output", "2", "--max-output", "6"]
    # A KV pool that holds the warm-up's longest request (520 + 4 tokens) rather than one sized from RAM.
    argv += ["--repeat", "1", "--num-kv-blocks", "128"]
    throughput.main([*argv, "--json", str(out)])
    _, output_lens = make_workload(4, 16, 24, 2, 6, 16384, seed=0)
    systems = json.loads(out.read_text())["systems"]
    assert set(systems) == {"engine", "hf-generate", "hf-generate-batch"}
    for name, result in systems.items():
        assert result["error"] is None, name
        assert result["output_tokens"] == sum(output_lens), name
    # Every timed engine step was timed, so that a compile inside the run would show.
    steps = json.loads(out.read_text())["engine_steps"]
    assert steps["steps"] > 0 and steps["longest_ms"] >= steps["median_ms"] > 0
    # The summary gpu_check.sh ends with: a row per system, the engine's steps, then the preset's targets.
    names = [row.split(" | ")[1] for row in report.summarize([str(out)])[2:]]
    assert names[: len(systems)] == list(systems)
    assert names[len(systems)] == "engine steps"
    assert all(name.startswith("target: ") for name in names[len(systems) + 1 :])


def test_structured_cost_compares_equal_token_counts(tmp_path):
    out = tmp_path / "structured.json"
    # Outputs capped at 40 tokens (the default 400 is ~600 steps): the free run still gets each
    # constrained output's length, capped or complete, and must match it.
    argv = ["--num-seqs", "3", "--max-input", "20", "--max-tokens", "40", "--repeat", "1", "--json", str(out)]
    result = structured_cost.main(argv)
    assert result["output_tokens_last_run"] > 0
    assert json.loads(out.read_text())["requests"] == 3


def test_serving_launches_measures_and_stops_its_own_server(tmp_path):
    out = tmp_path / "serving.json"
    # The engine in the server's process: one interpreter less to start. (The server's own stop, engine
    # process included, is the next test's.)
    flags = "--model demo-random --device cpu --num-kv-blocks 128 --no-engine-process"
    argv = ["--launch", flags, "--num-prompts", "4", "--concurrency", "2", "--warmup", "1"]
    assert serving.main([*argv, "--input-len", "8", "--output-len", "5", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 4 * 5  # ignore_eos: every request ran to --output-len


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (name) state ppid ...": the name may hold spaces, so split after its ")".
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serving_stops_its_launched_server_when_terminated():
    """gpu_check.sh ends a step with SIGTERM at its cap: the client must stop its server, not orphan it."""
    launch = "--model demo-random --device cpu --num-kv-blocks 128 --shutdown-timeout 1"
    # 1000 requests of 64 tokens at concurrency 2 keep it busy for minutes, far past the SIGTERM below
    # (100000 took 15 s more: the client creates every request's task up front, and cancels each one).
    command = [sys.executable, "-m", "benchmarks.serving", "--launch", launch, "--num-prompts", "1000"]
    command += ["--concurrency", "2", "--input-len", "8", "--output-len", "64"]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        server = None
        while server is None and time.monotonic() < deadline:  # the server it launched, and its port
            for pid in _descendants(process.pid):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"--port" in argv:
                    server, port = pid, int(argv[argv.index(b"--port") + 1])
            time.sleep(0.2)
        assert server is not None, "the server was never launched"
        while time.monotonic() < deadline:  # serving, with requests in flight
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        time.sleep(1.0)
        launched = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 1 and "stopped by signal 15" in output, output[-2000:]
        assert not [pid for pid in launched if _alive(pid)], "the server (or its engine process) outlived the client"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of its group is left
            os.killpg(process.pid, signal.SIGKILL)


def test_the_serving_warm_up_runs_the_throughput_warm_ups_shape_classes():
    assert serving.WARMUP_PROMPT_LENGTHS == throughput.WARMUP_PROMPT_LENGTHS


def test_profile_step_reaches_a_steady_decode_batch(tmp_path):
    config = tmp_path / "config.json"
    config.write_text((demo_model_path() / "config.json").read_text())
    argv = ["--model-config", str(config), "--device", "cpu", "--dtype", "float32"]
    result = profile_step.main([*argv, "--batch", "3", "--context", "20", "--steps", "2"])
    assert result["running"] == 3 and result["wall_ms_per_step"] > 0


def test_summary_compares_baselines_run_apart_with_the_engine_of_their_preset(tmp_path):
    def system(name, tokens, seconds):
        return {"system": name, "output_tokens": tokens, "seconds": seconds, "error": None, "note": "",
                "partial": False, "tokens_per_s": tokens / seconds}  # fmt: skip

    engine = tmp_path / "qwen3-0.6b.json"
    engine.write_text(json.dumps({"run": {"preset": "qwen3-0.6b"}, "systems": {"engine": system("engine", 900, 1.0)}}))
    baselines = tmp_path / "qwen3-0.6b-baselines.json"
    hf = {"hf-generate": system("hf-generate", 300, 1.0), "hf-generate-batch": system("hf-generate-batch", 400, 1.0)}
    baselines.write_text(json.dumps({"run": {"preset": "qwen3-0.6b"}, "systems": hf}))
    rows = [row.split(" | ") for row in report.summarize([str(engine), str(baselines)])[2:]]
    by_system = {(row[0].strip("| "), row[1]): row for row in rows}
    assert by_system[("qwen3-0.6b-baselines", "hf-generate")][3] == "0.33x"  # 300 against the engine's 900
    # The preset's target (engine >= 3x generate_batch): 900 / 400 = 2.25x, missed.
    target = by_system[("qwen3-0.6b-baselines", "target: engine / hf-generate-batch")]
    assert target[2] == "2.25x" and target[5].startswith(">= 3.0x MISSED")


SPECULATIVE_TINY = ["--model", "demo-random", "--device", "cpu", "--dtype", "float32", "--echo-max-tokens", "6"]
SPECULATIVE_TINY += ["--output-len", "5", "--min-input", "4", "--max-input", "12"]


def test_speculative_runs_both_workloads_with_and_without_speculation(tmp_path, capsys):
    out = tmp_path / "speculative.json"
    argv = [*SPECULATIVE_TINY, "--concurrency", "1,3", "--clock", "cpu", "--json", str(out)]
    assert speculative.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["identical"] is True
    cases = data["cases"]
    assert [(c["workload"], c["concurrency"], c["requests"]) for c in cases] == [
        ("echo", 1, 2),  # --min-requests 2: two batches of one
        ("echo", 3, 3),
        ("random", 1, 2),
        ("random", 3, 3),
    ]
    for case in cases:
        assert case["identical"], case
        assert case["off"]["output_tokens"] == case["on"]["output_tokens"] > 0
        assert case["off"]["spec"] == {}  # the engine without speculation has no counters
        assert case["on"]["spec"]["spec_num_accepted_tokens"] <= case["on"]["spec"]["spec_num_draft_tokens"]
        if case["workload"] == "random":  # ignore_eos: every request ran to --output-len
            assert case["off"]["output_tokens"] == 5 * case["requests"]
            # Full-batch decode: the 4 steps after each prefill; speculation may need fewer.
            assert case["off"]["decode_tokens"] == 4 * case["requests"]
            assert 0 < case["on"]["decode_tokens"] <= 4 * case["requests"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    columns = "workload | concurrency | tok/s off | tok/s on | ratio | acceptance | mean accepted per step"
    assert table[0] == f"| {columns} | full-batch decode ratio |"
    assert [row.split(" | ")[:2] for row in table[2:]] == [
        ["| echo", "1"],
        ["| echo", "3"],
        ["| random", "1"],
        ["| random", "3"],
    ]
    # gpu_check.sh's summary: a row per case, speculation on against off.
    rows = report.summarize([str(out)])[2:]
    assert len(rows) == 4 and all("outputs identical" in row for row in rows)


def test_speculative_fails_when_speculation_changes_an_output(tmp_path, monkeypatch, capsys):
    measured = speculative.timed_run

    def corrupted(*args):
        run = measured(*args)
        llm = args[0]
        if llm.engine.speculator is not None:  # the engine with speculation: one token differs
            run.token_ids[1][2] += 1
        return run

    monkeypatch.setattr(speculative, "timed_run", corrupted)
    out = tmp_path / "speculative.json"
    argv = [*SPECULATIVE_TINY, "--workloads", "random", "--concurrency", "2", "--json", str(out)]
    assert speculative.main(argv) == 1
    assert "WARNING: random c=2: request 1 differs at output position 2" in capsys.readouterr().out
    assert json.loads(out.read_text())["identical"] is False
