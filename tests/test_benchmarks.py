"""The benchmark scripts run end to end on a tiny workload (their numbers are not asserted)."""

from __future__ import annotations

import json

from benchmarks import profile_step, report, serving, structured_cost, throughput
from benchmarks.workload import make_workload
from engine.demo_model import demo_model_path


def test_throughput_runs_every_system_on_the_same_workload(tmp_path):
    out = tmp_path / "throughput.json"
    argv = ["--preset", "cpu-small", "--num-seqs", "4", "--max-input", "24", "--min-output", "2", "--max-output", "6"]
    argv += ["--repeat", "1"]
    throughput.main([*argv, "--json", str(out)])
    _, output_lens = make_workload(4, 16, 24, 2, 6, 16384, seed=0)
    systems = json.loads(out.read_text())["systems"]
    assert set(systems) == {"engine", "hf-generate", "hf-generate-batch"}
    for name, result in systems.items():
        assert result["error"] is None, name
        assert result["output_tokens"] == sum(output_lens), name
    # The summary gpu_check.sh ends with: a row per system, then the preset's targets.
    names = [row.split(" | ")[1] for row in report.summarize([str(out)])[2:]]
    assert names[: len(systems)] == list(systems)
    assert all(name.startswith("target: ") for name in names[len(systems) :])


def test_structured_cost_compares_equal_token_counts(tmp_path):
    out = tmp_path / "structured.json"
    result = structured_cost.main(["--num-seqs", "3", "--max-input", "20", "--repeat", "1", "--json", str(out)])
    assert result["output_tokens_last_run"] > 0
    assert json.loads(out.read_text())["requests"] == 3


def test_serving_launches_measures_and_stops_its_own_server(tmp_path):
    out = tmp_path / "serving.json"
    flags = "--model demo-random --device cpu --num-kv-blocks 128"
    argv = ["--launch", flags, "--num-prompts", "4", "--concurrency", "2"]
    assert serving.main([*argv, "--input-len", "8", "--output-len", "5", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 4 * 5  # ignore_eos: every request ran to --output-len


def test_profile_step_reaches_a_steady_decode_batch(tmp_path):
    config = tmp_path / "config.json"
    config.write_text((demo_model_path() / "config.json").read_text())
    argv = ["--model-config", str(config), "--device", "cpu", "--dtype", "float32"]
    result = profile_step.main([*argv, "--batch", "3", "--context", "20", "--steps", "2"])
    assert result["running"] == 3 and result["wall_ms_per_step"] > 0
