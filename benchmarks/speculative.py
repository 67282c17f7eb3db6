"""Speculative decoding: the same engine settings with and without speculation, in one process.

    python -m benchmarks.speculative                      # SmolLM2-135M-Instruct (real weights) on the CPU
    python -m benchmarks.speculative --preset qwen3-0.6b --workloads random --concurrency 1,64
    python -m benchmarks.speculative --method draft_model --draft-model PATH

Two workloads: "echo", chat prompts whose answer repeats part of the prompt (copy this paragraph,
fix the typo in this function: benchmarks/echo_prompts.py), greedy; it needs a model with a
tokenizer and real weights (a random model does not copy its prompt). "random", the throughput
benchmark's random token-id prompts with ignore_eos and seeded sampling, where n-gram lookup finds
little. Both are decoding-bound: greedy and seeded requests must give the same tokens with
speculation on and off, which is checked token for token (a difference prints a warning and the
exit status is 1).

Concurrency C: the requests are submitted C at a time (LLM.generate over batches of C, max_num_seqs
at least C), so C sequences decode together until they finish. Both engines are built before any
timed run, and the runs of a case alternate which engine goes first, so a shared machine's drift
weighs on both. Prefix caching is off: a later case must not find an earlier one's prompts cached.
"ratio" is the whole wave's (prefill, decode and the tail in which its slowest rows finish);
"full-batch decode ratio" compares only the steps that decode all C rows at once, the steady state
of serving C requests (a wave ends with its slowest row, which speculation may not have sped up).
On CUDA each engine takes 40% of the card unless --gpu-memory-utilization says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.echo_prompts import echo_conversations
from benchmarks.throughput import StepTimer, prepare_model_dir, warm_up
from benchmarks.workload import (
    PRESETS,
    Report,
    add_engine_arguments,
    dummy_engine_config,
    git_commit,
    make_workload,
    sync_device,
)

WORKLOADS = ("echo", "random")
SPEC_COUNTERS = ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")
TABLE_COLUMNS = (
    "workload",
    "concurrency",
    "tok/s off",
    "tok/s on",
    "ratio",
    "acceptance",
    "mean accepted per step",
    "full-batch decode ratio",
)


@dataclass
class Run:
    """One timed pass of a case's requests through one engine."""

    seconds: float
    token_ids: list[list[int]]
    steps: int
    longest_step_ms: float
    load_average: float
    preemptions: int
    # Pure-decode steps with the whole batch running (FullBatchDecode): the steady state of C at once.
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    spec: dict[str, Any] = field(default_factory=dict)  # the speculation counters this run added

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None

    def summary(self) -> dict[str, Any]:
        summary = {k: v for k, v in dataclasses.asdict(self).items() if k != "token_ids"}
        rates = {"tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}
        return {**summary, "output_tokens": self.output_tokens, **rates}


@dataclass
class Case:
    workload: str
    concurrency: int
    off: Run
    on: Run

    @property
    def ratio(self) -> float:
        return self.on.tokens_per_s / self.off.tokens_per_s if self.off.tokens_per_s else 0.0

    @property
    def decode_ratio(self) -> float | None:
        on, off = self.on.decode_tokens_per_s, self.off.decode_tokens_per_s
        return on / off if on and off else None

    @property
    def acceptance(self) -> float | None:
        """Accepted proposals over proposed tokens; None when nothing was proposed."""
        drafted = self.on.spec.get("spec_num_draft_tokens", 0)
        return self.on.spec["spec_num_accepted_tokens"] / drafted if drafted else None

    @property
    def mean_accepted(self) -> float | None:
        """Accepted proposals per verified row (a row that carried at least one proposal)."""
        drafts = self.on.spec.get("spec_num_drafts", 0)
        return self.on.spec["spec_num_accepted_tokens"] / drafts if drafts else None

    @property
    def mismatch(self) -> tuple[int, int] | None:
        return first_mismatch(self.off.token_ids, self.on.token_ids)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "concurrency": self.concurrency,
            "requests": len(self.off.token_ids),
            "off": self.off.summary(),
            "on": self.on.summary(),
            "ratio": self.ratio,
            "decode_ratio": self.decode_ratio,
            "acceptance": self.acceptance,
            "mean_accepted_per_step": self.mean_accepted,
            "identical": self.mismatch is None,
        }


def first_mismatch(expected: list[list[int]], actual: list[list[int]]) -> tuple[int, int] | None:
    """(request, position) of the first token that differs, the position being the shorter output's
    length when one output is a prefix of the other; None when all are equal."""
    if len(expected) != len(actual):
        return (min(len(expected), len(actual)), 0)
    for index, (a, b) in enumerate(zip(expected, actual)):
        if a != b:
            position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return (index, position)
    return None


# ---- the engines ----------------------------------------------------------------------------------


def speculative_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {"method": args.method, "num_speculative_tokens": args.num_speculative_tokens}
    if args.method == "draft_model":
        config["model"] = args.draft_model
    else:
        config["prompt_lookup_min"] = args.prompt_lookup_min
        config["prompt_lookup_max"] = args.prompt_lookup_max
    if args.disable_by_batch_size is not None:
        config["disable_by_batch_size"] = args.disable_by_batch_size
    return config


def build_engine(args: argparse.Namespace, model_dir: str, speculation: dict[str, Any] | None):
    from engine import LLM

    config = dataclasses.replace(
        dummy_engine_config(args, model_dir),
        skip_tokenizer_init=args.load_format == "dummy",
        enable_prefix_caching=False,
        speculative_config=speculation,
    )
    return LLM(config=config)


def warm_up_engine(llm) -> None:
    """On CUDA, every kernel version the runs need (throughput's warm-up); on the CPU, nothing
    compiles, so one short batch settles the allocator."""
    from engine import SamplingParams

    if llm.engine.device.type == "cuda":
        warm_up(llm, temperature=0.0)
    else:
        llm.generate([[1, 2, 3, 4], [5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))


# ---- the workloads --------------------------------------------------------------------------------


def echo_workload(llm, count: int, args: argparse.Namespace) -> tuple[list[list[int]], list]:
    """Greedy chat prompts whose answer copies part of the prompt; answers end at EOS or max_tokens."""
    from engine import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts = [
        list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
        for c in echo_conversations(count)
    ]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=args.echo_max_tokens)] * count


def random_workload(llm, count: int, args: argparse.Namespace) -> tuple[list[list[int]], list]:
    """The throughput benchmark's random token ids, ignore_eos; seeded when sampled, so that the
    outputs with and without speculation must still be equal."""
    from engine import SamplingParams

    prompts, _ = make_workload(count, args.min_input, args.max_input, 1, 1, llm.engine.vocab_size, args.seed)
    seeded = args.random_temperature > 0
    params = [
        SamplingParams(
            temperature=args.random_temperature,
            seed=args.seed + i if seeded else None,
            max_tokens=args.output_len,
            ignore_eos=True,
        )
        for i in range(count)
    ]
    return prompts, params


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class FullBatchDecode(StepTimer):
    """Times every step, and sums the output tokens and seconds of the steps that decode the whole
    batch: `concurrency` sequences running, each past its prompt. A wave's prefill and its tail
    (the batch shrinking as rows finish) are left out, which leaves the steady state of serving C
    requests at once. The whole wave's rate, in contrast, waits for its slowest row."""

    def __init__(self, engine, concurrency: int, clock) -> None:
        super().__init__(engine)
        self.concurrency = concurrency
        self.clock = clock
        self.tokens = 0
        self.decode_seconds = 0.0

    def before_step(self) -> tuple[int, float] | None:
        """The engine's token count and the clock when this step decodes the whole batch; else None."""
        running = self.engine.scheduler.running
        full = len(running) == self.concurrency and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
        return (self.engine.generation_tokens_total, self.clock()) if full else None

    def after_step(self, state: tuple[int, float] | None, seconds: float) -> None:
        if state is not None:
            self.tokens += self.engine.generation_tokens_total - state[0]
            self.decode_seconds += self.clock() - state[1]


def timed_run(llm, prompts: list[list[int]], params: list, concurrency: int, clock_name: str = "wall") -> Run:
    """The requests through llm.generate, `concurrency` at a time. The "cpu" clock counts this
    process's CPU seconds (all its threads), not the wall's: on a shared CPU, what other processes
    take then does not count (the device's time does not count either: CPU only)."""
    clock = CLOCKS[clock_name]
    before = llm.stats()
    load = os.getloadavg()[0]
    device = llm.engine.device
    outputs = []
    sync_device(device)
    with FullBatchDecode(llm.engine, concurrency, clock) as timer:
        start = clock()
        for first in range(0, len(prompts), concurrency):
            batch = slice(first, first + concurrency)
            outputs += llm.generate(prompts[batch], params[batch])
        sync_device(device)
        seconds = clock() - start
    after = llm.stats()
    spec = {key: after[key] - before[key] for key in SPEC_COUNTERS if key in after}
    for key in ("spec_num_draft_tokens_per_pos", "spec_num_accepted_tokens_per_pos"):
        if key in after:
            spec[key] = [a - b for a, b in zip(after[key], before[key])]
    return Run(
        seconds=seconds,
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        steps=len(timer.seconds),
        longest_step_ms=timer.longest()[1] * 1e3,
        load_average=load,
        preemptions=after["num_preemptions"] - before["num_preemptions"],
        decode_tokens=timer.tokens,
        decode_seconds=timer.decode_seconds,
        spec=spec,
    )


# ---- the report -----------------------------------------------------------------------------------


def format_table(cases: list[dict[str, Any]]) -> list[str]:
    """The markdown table of Case.as_dict() rows (as the --json report holds them)."""

    def maybe(value: float | None, template: str) -> str:
        return "-" if value is None else template.format(value)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for case in cases:
        cells = (
            case["workload"],
            str(case["concurrency"]),
            f"{case['off']['tokens_per_s']:.1f}",
            f"{case['on']['tokens_per_s']:.1f}",
            f"{case['ratio']:.2f}x",
            maybe(case["acceptance"], "{:.1%}"),
            maybe(case["mean_accepted_per_step"], "{:.2f}"),
            maybe(case["decode_ratio"], "{:.2f}x"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smollm2")
    parser.add_argument("--model", help="a checkpoint (directory, hub id or built-in name) instead of the preset's")
    parser.add_argument("--model-config", help="a config.json instead of the preset's: dummy weights, random only")
    parser.add_argument("--workloads", help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all it can)")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated batch sizes (default: 1,8,64)")
    parser.add_argument("--min-requests", type=int, default=2, help="requests per case at least (whole batches)")
    parser.add_argument("--method", choices=["ngram", "draft_model"], default="ngram")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--draft-model", help="the draft model (method draft_model)")
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--disable-by-batch-size", type=int, help="no speculation in steps of more sequences")
    parser.add_argument("--echo-max-tokens", type=int, default=128)
    parser.add_argument("--min-input", type=int, default=32, help="random workload's prompt tokens, at least")
    parser.add_argument("--max-input", type=int, default=96)
    parser.add_argument("--output-len", type=int, default=64, help="random workload's output tokens")
    parser.add_argument("--random-temperature", type=float, default=0.6, help="seeded; 0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed seconds; cpu: this process's CPU seconds (a shared CPU with --threads 1)",
    )
    parser.add_argument("--json", help="write every number here")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("device", "dtype", "max_model_len"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.model and args.model_config:
        parser.error("--model and --model-config exclude each other")
    args.load_format = "auto" if args.model or (preset.model and not args.model_config) else "dummy"
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency needs positive integers")
    if args.max_num_seqs is None:
        args.max_num_seqs = max(args.concurrency)
    if args.workloads is None:
        args.workloads = list(WORKLOADS) if args.load_format == "auto" else ["random"]
    else:
        args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    if "echo" in args.workloads and args.load_format == "dummy":
        parser.error("the echo workload needs a model with a tokenizer and real weights (--model or a real preset)")
    if (args.method == "draft_model") != bool(args.draft_model):
        parser.error("--draft-model is needed with --method draft_model, and only then")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"{args.device} asked for and no GPU is visible; try --preset cpu-smollm2")
    if args.device.startswith("cuda") and args.clock == "cpu":
        parser.error("--clock cpu does not count the GPU's time")
    if args.device.startswith("cuda") and args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.4  # two engines share the card
    return args


def main(argv: list[str] | None = None) -> int:
    """0: every output equal with and without speculation; 1: some differed; 2: an engine failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from engine.models.builtin_models import resolve_model

        model_dir = resolve_model(args.model).path
    else:
        model_dir = prepare_model_dir(PRESETS[args.preset], args.model_config)
    try:
        return _measure(args, model_dir, argv)
    finally:
        if args.load_format == "dummy":
            shutil.rmtree(model_dir, ignore_errors=True)


def _measure(args: argparse.Namespace, model_dir: str, argv: list[str] | None) -> int:
    speculation = speculative_config(args)
    report = Report(args.json)
    command = " ".join([Path(sys.executable).name, "-m", "benchmarks.speculative", *(argv or sys.argv[1:])])
    report.set(
        "run",
        {
            "preset": args.preset,
            "model": args.model or model_dir,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "commit": git_commit(),
            "device": args.device,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
            "speculative_config": speculation,
            "clock": args.clock,
            "concurrency_means": "requests submitted in batches of that size (LLM.generate per batch)",
            "command": command,
        },
    )
    engines = {}
    for name, config in (("off", None), ("on", speculation)):
        try:
            engines[name] = build_engine(args, model_dir, config)
            warm_up_engine(engines[name])
        except Exception as error:  # noqa: BLE001 - a draft model not there yet, say: reported, not raised
            logging.getLogger(__name__).exception("building the engine with speculation %s failed", name)
            report.set("error", f"engine with speculation {name}: {type(error).__name__}: {error}")
            print(f"# ERROR: the engine with speculation {name} failed: {type(error).__name__}: {error}")
            return 2
    print(f"# {command}\n# speculative_config {json.dumps(speculation)}; prefix caching off; {args.clock} clock")

    cases: list[Case] = []
    mismatched = False
    for workload in args.workloads:
        sizes = {c: -(-max(c, args.min_requests) // c) * c for c in args.concurrency}  # whole batches
        build = echo_workload if workload == "echo" else random_workload
        prompts, params = build(engines["off"], max(sizes.values()), args)
        for c in args.concurrency:
            n = sizes[c]
            # Alternate which engine runs first, so that drift on a shared machine favours neither.
            order = ("off", "on") if len(cases) % 2 == 0 else ("on", "off")
            runs = {name: timed_run(engines[name], prompts[:n], params[:n], c, args.clock) for name in order}
            case = Case(workload, c, runs["off"], runs["on"])
            cases.append(case)
            report.set("cases", [x.as_dict() for x in cases])
            print(
                f"# {workload} c={c}: {n} requests, {case.off.output_tokens} output tokens; "
                f"off {case.off.seconds:.1f} s in {case.off.steps} steps, on {case.on.seconds:.1f} s in "
                f"{case.on.steps} steps; load {case.off.load_average:.1f}-{case.on.load_average:.1f}"
            )
            if case.mismatch is not None:
                mismatched = True
                request, position = case.mismatch
                print(
                    f"# WARNING: {workload} c={c}: request {request} differs at output position {position} "
                    "with speculation on: speculation changed an answer"
                )
    for line in format_table([case.as_dict() for case in cases]):
        print(line)
    report.set("identical", not mismatched)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
