"""The soak and chaos harness in its short form (CI): a launched server through the abort storm,
mixed soak, overload, hostile inputs, an engine kill and SIGTERM, with every check after each phase.
The harness runs in its own session so that a timeout kills it and the server it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 600


def test_the_short_soak_runs_clean(tmp_path):
    report = tmp_path / "soak.json"
    command = [sys.executable, "-m", "benchmarks.soak", "--short", "--json", str(report),
               "--launch", "--model demo-random --device cpu --num-kv-blocks 32 --log-level warning"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the short soak ran past {TIMEOUT_S} s:\n{output[-4000:]}") from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-4000:]
    table = output[output.index("| phase") :]
    for phase in ("abort storm", "mixed soak", "overload", "engine kill", "SIGTERM mid-stream"):
        assert phase in table
    assert "BREACH" not in table and report.exists()
