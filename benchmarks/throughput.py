"""Offline throughput: the nano-vllm benchmark workload, the engine against transformers on the same model.

    python -m benchmarks.throughput --preset cpu-small
    python -m benchmarks.throughput --preset cpu-smollm2   # the default model's real weights
    python -m benchmarks.throughput --preset qwen3-0.6b --json /tmp/qwen3.json

The workload is nano-vllm's (random token-id prompts, per-request output lengths, ignore_eos,
seed 0, temperature 0.6), scaled by flags. Models are built from a config with dummy (random)
weights, so no checkpoint is read (cpu-smollm2 reads the default model's real weights). The
engine runs first; then its own model object, with the KV cache freed and attention switched to
SDPA, runs transformers' static batched `generate` and its continuous batching (`generate_batch`'s
manager), so all three systems use the very same weights.
On CUDA it also prints the card's roofline bound for the workload and a decode step at batch 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import roofline
from benchmarks.hf_baselines import load_model_only, model_for_transformers, run_hf_generate, run_hf_generate_batch
from benchmarks.report import format_table, print_targets
from benchmarks.workload import (
    PRESETS,
    PROMPT_ID_LIMIT,
    SYSTEMS,
    Preset,
    Report,
    SystemResult,
    add_engine_arguments,
    best_of,
    dummy_engine_config,
    free_device_memory,
    git_commit,
    make_workload,
    shifted_workloads,
    sync_device,
)

# ---- the engine ------------------------------------------------------------------------------------


def build_engine(args: argparse.Namespace, model_dir: str):
    from engine import LLM

    return LLM(config=dummy_engine_config(args, model_dir))


def _warmup_requests(vocab_size: int, count: int, max_len: int) -> list[list[int]]:
    rng = random.Random(12345)
    id_limit = min(PROMPT_ID_LIMIT, vocab_size)
    return [[rng.randrange(id_limit) for _ in range(rng.randint(4, max_len))] for _ in range(count)]


# Prompt lengths of the warm-up's single-request runs. Triton compiles one version of the attention
# kernel per tile shape, which follows the step's longest query rounded up to a power of two (up to
# 128 rows of heads x tokens), so each length below starts a step of its own class; 520 also makes
# the decode at batch 1 split its keys (flash-decoding) once the context passes four key tiles.
WARMUP_PROMPT_LENGTHS = (2, 3, 5, 9, 17, 33, 65, 129, 520)


def warm_up(llm, temperature: float, batch_size: int = 8) -> None:
    """Runs every kernel version a benchmark run needs before it is timed, so that no Triton compile
    (0.5-2 s each, the GPU idle meanwhile) lands inside the timed window: a prefill step of each
    query-length class, decode at batch 1 over short and long contexts, then a mixed batch.
    tests/test_kernel_specialization.py replays the qwen3-0.6b and llama-3.1-8b runs to check it."""
    from engine import SamplingParams

    engine = llm.engine
    rng = random.Random(12345)
    id_limit = min(PROMPT_ID_LIMIT, engine.vocab_size)
    single = SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True)
    for length in WARMUP_PROMPT_LENGTHS:
        length = max(1, min(length, engine.max_model_len - single.max_tokens))
        llm.generate([[rng.randrange(id_limit) for _ in range(length)]], single)
    batch = _warmup_requests(engine.vocab_size, batch_size, 64)
    llm.generate(batch, SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True))


class StepTimer:
    """Times each engine step while active: a kernel compiled inside a timed run shows as one step
    far longer than the rest (with async scheduling a step's time is the host's, which is where a
    compile stalls)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.seconds: list[float] = []

    def __enter__(self) -> StepTimer:
        step = self.engine.step

        def timed_step():
            state = self.before_step()
            start = time.perf_counter()
            try:
                return step()
            finally:
                self.seconds.append(time.perf_counter() - start)
                self.after_step(state, self.seconds[-1])

        self.engine.step = timed_step
        return self

    def __exit__(self, *exc_info) -> None:
        del self.engine.step  # back to the class's method

    def before_step(self) -> Any:
        """A subclass's look at the engine before a step; handed to after_step."""
        return None

    def after_step(self, state: Any, seconds: float) -> None:
        """A subclass's look at the engine after a step of `seconds`."""

    def longest(self) -> tuple[int, float]:
        """(index, seconds) of the longest step; (-1, 0.0) when none ran."""
        if not self.seconds:
            return -1, 0.0
        index = max(range(len(self.seconds)), key=self.seconds.__getitem__)
        return index, self.seconds[index]


def run_engine(
    llm,
    workloads: list[list[list[int]]],
    output_lens: list[int],
    temperature: float,
    report: Report | None = None,
) -> SystemResult:
    from engine import SamplingParams

    device = llm.engine.device
    warm_up(llm, temperature, batch_size=min(8, len(workloads[0])))
    params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True) for n in output_lens]
    runs = []
    step_times = []
    for prompts in workloads:
        load_before = os.getloadavg()[0]
        sync_device(device)
        with StepTimer(llm.engine) as timer:
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            sync_device(device)
            seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        notes = [] if tokens == sum(output_lens) else [f"generated {tokens} tokens, {sum(output_lens)} requested"]
        stats = llm.stats()
        notes.append(f"preemptions {stats.get('num_preemptions', 0)}")
        index, longest = timer.longest()
        median = sorted(timer.seconds)[len(timer.seconds) // 2] if timer.seconds else 0.0
        # A compile inside the timed window shows as one step of a second or so.
        notes.append(f"longest step {longest * 1e3:.1f} ms (median {median * 1e3:.1f})")
        if device.type == "cpu":
            notes.append(f"load {load_before:.1f}")
        runs.append(SystemResult("engine", tokens, seconds, note="; ".join(notes)))
        step_times.append(
            {
                "steps": len(timer.seconds),
                "longest_ms": longest * 1e3,
                "longest_index": index,
                "median_ms": median * 1e3,
            }
        )
    result = best_of(runs)
    if report is not None:
        report.set("engine_steps", step_times[runs.index(result)])
    result.note += f"; kv blocks {llm.stats()['kv_blocks_total']}"
    return result


def measure_decode_batch1(llm, temperature: float, prompt_len: int = 128, num_steps: int = 256) -> dict[str, float]:
    """Seconds per engine step with one sequence decoding (after its prefill step)."""
    from engine import SamplingParams
    from engine.sampling.sampling_params import OutputKind

    engine = llm.engine
    rng = random.Random(7)
    prompt = [rng.randrange(min(PROMPT_ID_LIMIT, engine.vocab_size)) for _ in range(prompt_len)]
    params = SamplingParams(
        temperature=temperature, max_tokens=num_steps + 1, ignore_eos=True, output_kind=OutputKind.FINAL_ONLY
    )
    engine.add_request("decode-batch1", prompt, params)
    engine.step()  # the prefill, which also samples the first token
    sync_device(engine.device)
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    sync_device(engine.device)
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "seconds_per_step": seconds / max(1, steps)}


# ---- the run -----------------------------------------------------------------------------------


def prepare_model_dir(preset: Preset, config_path: str | None) -> str:
    """The directory the engine loads: the preset's real checkpoint (the cache's, never removed), or a
    new temporary one holding just a config.json (dummy weights; the caller removes it)."""
    if preset.model and not config_path:
        from engine.models.builtin_models import resolve_model

        return resolve_model(preset.model).path  # the cache's directory: never removed below
    directory = tempfile.mkdtemp(prefix="sluice-bench-")
    if config_path:
        shutil.copyfile(config_path, Path(directory) / "config.json")
    elif preset.config_file:
        shutil.copyfile(preset.config_file, Path(directory) / "config.json")
    else:
        (Path(directory) / "config.json").write_text(json.dumps(preset.config, indent=2))
    return directory


def _vocab_size(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))


def _guarded(name: str, fn: Callable[[], SystemResult]) -> SystemResult:
    """Runs one system; a failure becomes its table row instead of ending the benchmark."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - any failure of a baseline is reported, not raised
        logging.getLogger(__name__).exception("%s failed", name)
        message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return SystemResult(name, error=message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Offline throughput: engine vs transformers on the same model.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--model-config", help="a config.json to benchmark instead of the preset's (dummy weights)")
    parser.add_argument("--num-seqs", type=int)
    parser.add_argument("--min-input", type=int)
    parser.add_argument("--max-input", type=int)
    parser.add_argument("--min-output", type=int)
    parser.add_argument("--max-output", type=int)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument("--hf-batch-size", type=int, help="static generate batch size (default: the whole workload)")
    parser.add_argument(
        "--hf-time-limit",
        type=float,
        help="seconds each transformers baseline may run; past it the run stops, its rate marked partial",
    )
    parser.add_argument("--json", help="write every number here")
    add_engine_arguments(parser)
    parser.add_argument("--no-roofline", action="store_true", help="on CUDA, skip the bound and the batch-1 step")
    parser.add_argument("--repeat", type=int, help="timed runs per system, best reported (default: the preset's)")
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="shard the engine's model over N ranks (N GPUs, or N gloo processes on the CPU); the transformers "
        "baselines and the single-device roofline are skipped",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in (
        "num_seqs",
        "min_input",
        "max_input",
        "min_output",
        "max_output",
        "device",
        "dtype",
        "max_model_len",
        "repeat",
    ):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    args.load_format = "auto" if preset.model and not args.model_config else "dummy"
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.tensor_parallel_size > 1:
        # The baselines would run the engine's sharded model in this process alone, and its workers
        # would never join their collectives; the roofline's model is one device's.
        args.systems = ["engine"]
        args.no_roofline = True
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset} runs on CUDA and no GPU is visible; try --preset cpu-small")
    if args.max_model_len < args.max_input + args.max_output:
        args.max_model_len = args.max_input + args.max_output
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    model_dir = prepare_model_dir(preset, args.model_config)
    vocab_size = _vocab_size(model_dir)
    prompts, output_lens = make_workload(
        args.num_seqs, args.min_input, args.max_input, args.min_output, args.max_output, vocab_size, args.seed
    )
    input_lens = [len(p) for p in prompts]
    workloads = shifted_workloads(prompts, vocab_size, args.repeat)
    import transformers

    report = Report(args.json)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    report.set(
        "run",
        {
            "preset": args.preset,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "commit": git_commit(),
            "card": card,
            "device": str(device),
            "dtype": args.dtype,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.throughput", *(argv or sys.argv[1:])]),
        },
    )
    report.set(
        "workload",
        {
            "num_seqs": args.num_seqs,
            "input_range": [args.min_input, args.max_input],
            "output_range": [args.min_output, args.max_output],
            "total_input_tokens": sum(input_lens),
            "total_output_tokens": sum(output_lens),
            "temperature": args.temperature,
            "seed": args.seed,
            "repeat": args.repeat,
        },
    )
    print(
        f"# {args.preset} on {card}: {args.num_seqs} requests, {sum(input_lens)} prompt tokens, "
        f"{sum(output_lens)} output tokens (torch {torch.__version__}, "
        f"transformers {transformers.__version__})"
    )

    do_roofline = device.type == "cuda" and not args.no_roofline
    measured: dict[str, float] = {}
    if do_roofline:
        # Measured on an empty card, before the engine's KV cache takes the memory.
        measured["bandwidth"] = roofline.measure_bandwidth(device)
        measured["matmul_rate"] = roofline.measure_matmul_rate(device)
        report.set("card_measured", measured)
        print(
            f"# measured: copy bandwidth {measured['bandwidth'] / 1e12:.2f} TB/s, "
            f"bf16 GEMM {measured['matmul_rate'] / 1e12:.0f} TFLOP/s"
        )

    results: list[SystemResult] = []
    model = None
    if "engine" in args.systems:
        model = _engine_stage(args, model_dir, workloads, output_lens, report, measured, results)
        free_device_memory(device)
        if device.type == "cuda":
            # What the baselines start with: only the model's weights should still be allocated.
            report.set("cuda_allocated_after_engine_gib", torch.cuda.memory_allocated(device) / 2**30)
    hf_systems = [s for s in args.systems if s != "engine"]
    if hf_systems and model is None:
        try:
            model = load_model_only(args, model_dir)
        except Exception as error:  # noqa: BLE001 - reported in each baseline's row
            logging.getLogger(__name__).exception("loading the model for transformers failed")
            message = f"model load failed: {type(error).__name__}: {error}".splitlines()[0][:300]
            for system in hf_systems:
                results.append(SystemResult(system, error=message))
                report.add_system(results[-1])
            hf_systems = []
    for system in hf_systems:
        torch.manual_seed(args.seed)
        if system == "hf-generate":
            batch_size = args.hf_batch_size or len(prompts)
            result = _guarded(
                system,
                lambda b=batch_size: run_hf_generate(
                    model, workloads, output_lens, args.temperature, b, args.hf_time_limit
                ),
            )
        else:
            result = _guarded(
                system,
                lambda: run_hf_generate_batch(model, workloads, output_lens, args.temperature, args.hf_time_limit),
            )
        results.append(result)
        report.add_system(result)
        free_device_memory(device)

    engine_rate = next((r.tokens_per_s for r in results if r.system == "engine" and not r.error), None)
    for line in format_table(results, engine_rate):
        print(line)
    print_targets(preset, results, engine_rate, report)
    if args.load_format == "dummy":
        shutil.rmtree(model_dir, ignore_errors=True)
    return report.data


def _engine_stage(
    args: argparse.Namespace,
    model_dir: str,
    workloads: list[list[list[int]]],
    output_lens: list[int],
    report: Report,
    measured: dict[str, float],
    results: list[SystemResult],
) -> torch.nn.Module | None:
    """Builds and times the engine (plus the bound on CUDA); returns its model for the baselines."""
    start = time.perf_counter()
    try:
        llm = build_engine(args, model_dir)
    except Exception as error:  # noqa: BLE001 - the baselines can still run on a model of their own
        logging.getLogger(__name__).exception("building the engine failed")
        message = f"build failed: {type(error).__name__}: {error}".splitlines()[0][:300]
        result = SystemResult("engine", error=message)
        results.append(result)
        report.add_system(result)
        return None
    report.set("engine_build_seconds", time.perf_counter() - start)
    engine_result = _guarded("engine", lambda: run_engine(llm, workloads, output_lens, args.temperature, report))
    if args.tensor_parallel_size > 1:
        llm.shutdown()  # stops the workers; nothing below uses the sharded model
    results.append(engine_result)
    report.add_system(engine_result)
    if measured:
        input_lens = [len(p) for p in workloads[0]]
        _roofline_stage(llm, report, measured, input_lens, output_lens, engine_result, args.temperature)
    if {"hf-generate", "hf-generate-batch"} & set(args.systems):
        return model_for_transformers(llm)
    return None


def _roofline_stage(
    llm,
    report: Report,
    measured: dict[str, float],
    input_lens: list[int],
    output_lens: list[int],
    engine_result: SystemResult,
    temperature: float,
) -> None:
    try:
        costs = roofline.model_costs(llm.engine.runner.model, llm.engine.runner.dtype)
        kv_tokens = llm.engine.kv_cache.num_blocks * llm.engine.config.block_size
        bound = roofline.workload_bound(
            input_lens,
            output_lens,
            costs,
            measured["bandwidth"],
            measured["matmul_rate"],
            kv_capacity_tokens=kv_tokens,
            max_num_seqs=llm.engine.config.max_num_seqs,
            block_size=llm.engine.config.block_size,
        )
        share = engine_result.tokens_per_s / bound.tokens_per_s if not engine_result.error else None
        report.set(
            "roofline",
            {
                "costs": asdict(costs),
                "kv_capacity_tokens": kv_tokens,
                "bound": bound.as_dict(),
                "engine_share": share,
            },
        )
        print(
            f"# roofline bound: {bound.tokens_per_s:,.0f} output tok/s ({bound.seconds:.2f} s: decode "
            f"{bound.decode_seconds:.2f} s over {bound.decode_steps} steps, "
            f"prefill {bound.prefill_seconds:.2f} s; weights {costs.weight_bytes / 2**30:.2f} GiB, "
            f"KV {costs.kv_bytes_per_token / 1024:.0f} KiB/token, "
            f"up to {bound.max_concurrent_seqs} sequences at once)"
        )
        if share is not None:
            print(f"# engine reaches {share:.1%} of the bound")
        batch1 = measure_decode_batch1(llm, temperature)
        weights_time = costs.weight_bytes / measured["bandwidth"]
        batch1["weights_over_bandwidth_s"] = weights_time
        batch1["ratio"] = batch1["seconds_per_step"] / weights_time
        report.set("decode_batch1", batch1)
        print(
            f"# decode at batch 1: {batch1['seconds_per_step'] * 1e3:.3f} ms/step "
            "vs weight bytes / bandwidth "
            f"{weights_time * 1e3:.3f} ms ({batch1['ratio']:.2f}x)"
        )
    except Exception as error:  # noqa: BLE001 - the bound is extra information; the run goes on
        logging.getLogger(__name__).exception("roofline failed")
        report.set("roofline_error", f"{type(error).__name__}: {error}")


def _exit_even_if_threads_linger() -> None:
    # A transformers manager thread that outlived its stop() would keep the process alive past
    # the numbers; they are printed and written by now.
    lingering = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if lingering:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
    _exit_even_if_threads_linger()
