"""The benchmark scripts run end to end on a tiny workload (their numbers are not asserted)."""

from __future__ import annotations

import json

from benchmarks import structured_cost, throughput
from benchmarks.workload import make_workload


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


def test_structured_cost_compares_equal_token_counts(tmp_path):
    out = tmp_path / "structured.json"
    result = structured_cost.main(["--num-seqs", "3", "--max-input", "20", "--repeat", "1", "--json", str(out)])
    assert result["output_tokens_last_run"] > 0
    assert json.loads(out.read_text())["requests"] == 3
