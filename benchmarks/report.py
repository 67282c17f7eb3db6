"""What the throughput benchmark prints: its table, its targets, and the summary over several runs.

python -m benchmarks.report A.json B.json   # one short table over --json reports (gpu_check.sh)

The summary also takes benchmarks.speculative's reports: a row per case, speculation on against off.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.workload import PRESETS, Preset, Report, SystemResult


def format_table(results: list[SystemResult], engine_rate: float | None) -> Iterator[str]:
    header = ("system", "output tokens", "seconds", "output tok/s", "vs engine")
    yield f"| {header[0]:<18} | {header[1]:>13} | {header[2]:>8} | {header[3]:>12} | {header[4]:>9} |"
    yield f"|{'-' * 20}|{'-' * 15}|{'-' * 10}|{'-' * 14}|{'-' * 11}|"
    for r in results:
        if r.error:
            yield f"| {r.system:<18} | {'error':>13} | {'-':>8} | {'-':>12} | {'-':>9} |  {r.error}"
            continue
        ratio = f"{r.tokens_per_s / engine_rate:.2f}x" if engine_rate else "-"
        mark = " (partial)" if r.partial else ""
        yield (
            f"| {r.system:<18} | {r.output_tokens:>13} | {r.seconds:>8.2f} | {r.tokens_per_s:>12.1f} "
            f"| {ratio:>9} |"
            f"{mark}{'  ' + r.note if r.note else ''}"
        )


def print_targets(preset: Preset, results: list[SystemResult], engine_rate: float | None, report: Report) -> None:
    checks = []
    by_name = {r.system: r for r in results}
    for system in ("hf-generate", "hf-generate-batch"):
        target = preset.targets.get(system)
        result = by_name.get(system)
        if target is None or result is None or result.error or not engine_rate or not result.tokens_per_s:
            continue
        speedup = engine_rate / result.tokens_per_s
        checks.append((f"engine / {system}", f"{speedup:.2f}x", f">= {target}x", speedup >= target))
    share = report.data.get("roofline", {}).get("engine_share")
    if "bound_share" in preset.targets and share is not None:
        target = preset.targets["bound_share"]
        checks.append(("share of roofline bound", f"{share:.1%}", f">= {target:.0%}", share >= target))
    batch1 = report.data.get("decode_batch1")
    if "batch1_over_weights" in preset.targets and batch1:
        target = preset.targets["batch1_over_weights"]
        checks.append(
            (
                "batch-1 step / weight time",
                f"{batch1['ratio']:.2f}x",
                f"<= {target}x",
                batch1["ratio"] <= target,
            )
        )
    for name, value, target, ok in checks:
        print(f"# target {name}: {value} ({target}): {'met' if ok else 'MISSED'}")
    report.set("targets", [{"name": n, "value": v, "target": t, "met": ok} for n, v, t, ok in checks])


def summarize(paths: list[str]) -> list[str]:
    """One short table over several --json reports (gpu_check.sh ends with it), a row label per file.

    A report without an engine (transformers' baselines, run apart from the engine) is compared with
    the first working engine of the same preset in an earlier report, targets included."""
    lines = [
        "| run | system | output tok/s | vs engine | share of bound | note |",
        "|---|---|---|---|---|---|",
    ]
    engine_rates: dict[str, float] = {}
    for path in paths:
        label = Path(path).stem
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            lines.append(f"| {label} | - | - | - | - | unreadable: {error} |")
            continue
        preset = data.get("run", {}).get("preset", label)
        systems = data.get("systems", {})
        engine = systems.get("engine")
        if engine is not None:
            engine_rate = None if engine.get("error") else engine.get("tokens_per_s")
            if engine_rate:
                engine_rates.setdefault(preset, engine_rate)
        else:
            engine_rate = engine_rates.get(preset)
        lines += _rows(label, data, systems, engine_rate)
        if engine is None and engine_rate:
            lines += _baseline_targets(label, preset, systems, engine_rate)
    return lines


def _baseline_targets(label: str, preset: str, systems: dict[str, Any], engine_rate: float) -> list[str]:
    targets = PRESETS[preset].targets if preset in PRESETS else {}
    lines = []
    for name, row in systems.items():
        target = targets.get(name)
        if target is None or row.get("error") or not row.get("tokens_per_s"):
            continue
        speedup = engine_rate / row["tokens_per_s"]
        status = "met" if speedup >= target else "MISSED"
        lines.append(f"| {label} | target: engine / {name} | {speedup:.2f}x | - | - | >= {target}x {status} |")
    return lines


def _rows(label: str, data: dict[str, Any], systems: dict[str, Any], engine_rate: float | None) -> list[str]:
    """The report's own rows: one per system, its engine steps, batch-1 decode, its targets."""
    lines = []
    for name, row in systems.items():
        if row.get("error"):
            lines.append(f"| {label} | {name} | error | - | - | {row['error'][:120]} |")
            continue
        rate = row["tokens_per_s"]
        ratio = f"{rate / engine_rate:.2f}x" if engine_rate else "-"
        share = ""
        bound = data.get("roofline", {})
        if name == "engine" and bound.get("engine_share") is not None:
            share = f"{bound['engine_share']:.1%} of {bound['bound']['tokens_per_s']:,.0f}"
        note = ("partial; " if row.get("partial") else "") + row.get("note", "")
        lines.append(f"| {label} | {name} | {rate:,.0f} | {ratio} | {share} | {note[:120]} |")
    steps = data.get("engine_steps")
    if steps:
        # A Triton compile inside the timed run shows as a longest step of a second or so.
        lines.append(
            f"| {label} | engine steps | {steps['steps']} steps | - | - | longest {steps['longest_ms']:.1f} ms "
            f"(step {steps['longest_index']}), median {steps['median_ms']:.1f} ms |"
        )
    batch1 = data.get("decode_batch1")
    if batch1:
        lines.append(
            f"| {label} | decode batch 1 | {batch1['seconds_per_step'] * 1e3:.3f} ms/step | - | "
            f"{batch1['ratio']:.2f}x weight time | weights/bandwidth "
            f"{batch1['weights_over_bandwidth_s'] * 1e3:.3f} ms |"
        )
    if data.get("roofline_error"):
        lines.append(f"| {label} | roofline | error | - | - | {data['roofline_error'][:120]} |")
    for target in data.get("targets", []):
        status = "met" if target["met"] else "MISSED"
        name, value = target["name"], target["value"]
        lines.append(f"| {label} | target: {name} | {value} | - | - | {target['target']} {status} |")
    lines += [_speculation_row(label, data, case) for case in data.get("cases", [])]
    if data.get("error"):
        lines.append(f"| {label} | - | error | - | - | {data['error'][:120]} |")
    return lines


def _speculation_row(label: str, data: dict[str, Any], case: dict[str, Any]) -> str:
    """A case of benchmarks.speculative: the rate with speculation, its ratio to the rate without."""
    config = data.get("run", {}).get("speculative_config", {})
    method = f"{config.get('method')} k={config.get('num_speculative_tokens')}"
    name = f"spec {method} {case['workload']} c={case['concurrency']}"
    acceptance = "-" if case["acceptance"] is None else f"{case['acceptance']:.1%}"
    decode = "-" if case.get("decode_ratio") is None else f"{case['decode_ratio']:.2f}x"
    verdict = "outputs identical" if case["identical"] else "OUTPUTS DIFFER"
    return (
        f"| {label} | {name} | {case['on']['tokens_per_s']:,.0f} | {case['ratio']:.2f}x off | - | "
        f"off {case['off']['tokens_per_s']:,.0f} tok/s; full-batch decode {decode} off; "
        f"acceptance {acceptance}; {verdict} |"
    )


if __name__ == "__main__":
    print("\n".join(summarize(sys.argv[1:])))
