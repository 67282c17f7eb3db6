"""Where a steady decode step's time goes on the GPU: its kernels, against the step's memory bound.

    python -m benchmarks.profile_step --model-config configs/models/qwen3-0.6b.json --batch 256 --context 1024

Builds the engine on dummy weights, brings `--batch` sequences of `--context` prompt tokens into
decode, then runs `--steps` engine steps under torch.profiler. Prints the wall time per step, the
GPU kernel time per step, the top kernels, and the bound: (weight bytes + KV bytes read per step)
over the measured copy bandwidth. If CUDA-graph replays hide their kernels from the profiler, the
same steps are profiled again eagerly.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.roofline import measure_bandwidth, model_costs
from benchmarks.workload import sync_device
from engine import LLM, SamplingParams
from engine.sampling.sampling_params import OutputKind


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", default="configs/models/qwen3-0.6b.json", help="a config.json")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--sync", action="store_true", help="synchronous scheduling (default: the device's)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="default: just what the steps need; the benchmark's own (4096) captures the same decode graphs, "
        "so the kernels it compiled are reused from Triton's cache instead of compiled again",
    )
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


def _kernel_times(prof: profile, steps: int) -> list[tuple[str, float, float]]:
    """(name, calls per step, microseconds per step) of each GPU kernel or copy, longest first."""
    rows = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = getattr(event, "self_cuda_time_total", 0.0)
        rows.append((event.key, event.count / steps, micros / steps))
    return sorted(rows, key=lambda row: -row[2])


def _profile_steps(engine, steps: int) -> tuple[float, list[tuple[str, float, float]]]:
    sync_device(engine.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync_device(engine.device)
        wall = (time.perf_counter() - start) / steps
    return wall, _kernel_times(prof, steps)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_dir = tempfile.mkdtemp(prefix="sluice-profile-")
    shutil.copyfile(args.model_config, Path(model_dir) / "config.json")
    llm = LLM(
        model=model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        device=args.device,
        max_model_len=max(args.max_model_len or 0, args.context + 4 * args.steps + 64),
        max_num_seqs=args.batch,
        async_scheduling=False if args.sync else None,
        enforce_eager=args.enforce_eager,
    )
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(
        temperature=args.temperature,
        max_tokens=4 * args.steps + 32,
        ignore_eos=True,
        output_kind=OutputKind.FINAL_ONLY,
    )
    for i in range(args.batch):
        engine.add_request(f"profile-{i}", [rng.randrange(16, 1000) for _ in range(args.context)], params)
    # Prefill everything, then a few decode steps so every sequence decodes and graphs are warm.
    while (
        any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    running = len(engine.scheduler.running)

    wall, kernels = _profile_steps(engine, args.steps)
    graphs_hidden = sum(micros for _, _, micros in kernels) < 0.05 * wall * 1e6
    if graphs_hidden and engine.runner.graph_runner is not None:
        # Depends on the CUDA and profiler versions; eager steps show the same kernels, plus launches.
        print("CUDA-graph kernels are invisible to the profiler here: profiling the same steps eagerly")
        engine.runner.graph_runner = None
        wall, kernels = _profile_steps(engine, args.steps)

    costs = model_costs(engine.runner.model)
    context = args.context + 3 + args.steps / 2
    kv_bytes = running * context * costs.kv_bytes_per_token
    bandwidth = measure_bandwidth(engine.device) if engine.device.type == "cuda" else float("nan")
    bound_ms = (costs.weight_bytes + kv_bytes) / bandwidth * 1e3
    gpu_ms = sum(micros for _, _, micros in kernels) / 1e3 or float("nan")
    card = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    print(
        f"\n{running} sequences decoding at ~{context:.0f} tokens of context, {args.steps} steps, "
        f"{'sync' if args.sync else 'default'} scheduling, {card}"
    )
    print(f"wall per step       {wall * 1e3:8.2f} ms")
    print(f"GPU kernels / step  {gpu_ms:8.2f} ms  ({gpu_ms / (wall * 1e3):.0%} of wall)")
    print(
        f"memory bound / step {bound_ms:8.2f} ms  (weights {costs.weight_bytes / 1e9:.2f} GB + KV "
        f"{kv_bytes / 1e9:.2f} GB at {bandwidth / 1e12:.2f} TB/s): {bound_ms / (wall * 1e3):.0%} of wall"
    )
    print("\n| kernel | calls/step | us/step | share |\n|---|---|---|---|")
    for name, calls, micros in kernels[: args.top]:
        print(f"| {name[:90]} | {calls:.0f} | {micros:.0f} | {micros / 1e3 / gpu_ms:.1%} |")
    result = {
        "running": running,
        "wall_ms_per_step": wall * 1e3,
        "gpu_ms_per_step": gpu_ms,
        "bound_ms_per_step": bound_ms,
        "kernels_per_step": sum(calls for _, calls, _ in kernels),
        "top_kernels": kernels[: args.top],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
