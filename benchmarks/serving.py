"""Online serving benchmark: concurrent streaming clients against a running OpenAI-compatible server.

    sluice serve --model Qwen/Qwen3-0.6B &
    python -m benchmarks.serving --num-prompts 200 --concurrency 32 --input-len 256 --output-len 128

or, starting (and afterwards stopping) the server itself with the given `sluice serve` flags:

    python -m benchmarks.serving --launch "--config configs/h100-qwen3-0.6b.yaml" --concurrency 64

Each request streams from /v1/completions (token-id prompts, the default) or /v1/chat/completions
(random text prompts) with `ignore_eos`, so every request generates exactly --output-len tokens.
Reports request throughput, output tokens/s, and TTFT, TPOT and ITL (mean, p50, p99):
  TTFT  time to first token: request sent -> first content event
  TPOT  time per output token after the first: (latency - TTFT) / (output tokens - 1), per request
  ITL   inter-token latency: the gaps between successive content events, over all requests
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

_WORDS = (
    "the of and to in is that for it with as was on be at by this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out river "
    "engine token block cache stream batch model prompt answer question story robot library weather "
    "bridge evening morning"
).split()


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(args: argparse.Namespace) -> list[Any]:
    rng = random.Random(args.seed)
    prompts: list[Any] = []
    for _ in range(args.num_prompts):
        if args.prompt_kind == "tokens":
            low, high = args.token_id_range
            prompts.append([rng.randrange(low, high) for _ in range(args.input_len)])
        else:
            # About one token per common English word: close to --input-len for most tokenizers;
            # the report uses the prompt tokens the server counted.
            prompts.append(" ".join(rng.choice(_WORDS) for _ in range(args.input_len)))
    return prompts


async def run_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str, prompt: Any) -> RequestResult:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": args.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": args.temperature,
    }
    if args.ignore_eos:  # a vLLM extension: sent only when used, as servers without it (transformers) refuse it
        body["ignore_eos"] = True
    if args.prompt_kind == "tokens":
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if not text:
                    continue  # the role-only first chat event carries no token
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


# One request alone per prompt length, before the concurrent warm-up: the server's engine then
# compiles every Triton kernel version (one per class of the step's longest query) before the
# measured requests, as benchmarks.throughput.warm_up does (the same lengths).
WARMUP_PROMPT_LENGTHS = (2, 3, 5, 9, 17, 33, 65, 129, 520)


async def _warm_up_shape_classes(client: httpx.AsyncClient, args: argparse.Namespace, model: str) -> None:
    for length in WARMUP_PROMPT_LENGTHS:
        single = argparse.Namespace(**{**vars(args), "input_len": length, "output_len": 4, "num_prompts": 1})
        await run_request(client, single, model, make_prompts(single)[0])  # a refusal (too long) is fine


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency or args.num_prompts, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model
        if model is None:
            response = await client.get("/v1/models")
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        prompts = make_prompts(args)
        semaphore = asyncio.Semaphore(args.concurrency) if args.concurrency else None
        rng = random.Random(args.seed + 1)

        async def limited(prompt: Any) -> RequestResult:
            if semaphore is None:
                return await run_request(client, args, model, prompt)
            async with semaphore:
                return await run_request(client, args, model, prompt)

        if args.warmup:
            await _warm_up_shape_classes(client, args, model)
            await asyncio.gather(*(limited(p) for p in prompts[: args.warmup]))
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(limited(prompt)))
            if math.isfinite(args.request_rate):
                # Poisson arrivals: exponential gaps with mean 1 / rate.
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, p50 and p99 in milliseconds (by default)."""
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def percentile(q: float) -> float:
        # Linear interpolation between closest ranks, as numpy.percentile does by default.
        position = (len(ordered) - 1) * q
        low, high = math.floor(position), math.ceil(position)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {
        "mean": statistics.fmean(values) * scale,
        "p50": percentile(0.50) * scale,
        "p99": percentile(0.99) * scale,
    }


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "json")} | {"model": model},
        "completed": len(done),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "duration_s": duration,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput_rps": len(done) / duration,
        "output_throughput_tok_s": output_tokens / duration,
        "total_throughput_tok_s": (prompt_tokens + output_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([gap for r in done for gap in r.itl]),
        "e2e_latency_ms": _stats([r.latency for r in done]),
    }


def format_report(summary: dict[str, Any]) -> str:
    config = summary["config"]
    lines = [
        f"model {config['model']}  prompts {config['num_prompts']}  input {config['input_len']} "
        f"({config['prompt_kind']})  output {config['output_len']}  "
        f"concurrency {config['concurrency'] or 'unbounded'}  request rate {config['request_rate']}",
        f"{'completed / failed':<34}{summary['completed']} / {summary['failed']}",
        f"{'duration (s)':<34}{summary['duration_s']:.2f}",
        f"{'request throughput (req/s)':<34}{summary['request_throughput_rps']:.2f}",
        f"{'output throughput (tok/s)':<34}{summary['output_throughput_tok_s']:.1f}",
        f"{'total throughput (tok/s)':<34}{summary['total_throughput_tok_s']:.1f}",
        f"{'':<34}{'mean':>10}{'p50':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2e_latency_ms", "E2E latency (ms)")):  # fmt: skip
        stats = summary[key]
        lines.append(f"{label:<34}{stats['mean']:>10.2f}{stats['p50']:>10.2f}{stats['p99']:>10.2f}")
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    parser.add_argument("--api-key", default=os.environ.get("SLUICE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: unbounded)")
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default: all at once)",
    )
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (token ids) or words (text)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--prompt-kind",
        choices=["tokens", "text"],
        default="tokens",
        help="random token ids via /v1/completions, or random text via /v1/chat/completions",
    )
    parser.add_argument(
        "--token-id-range",
        type=int,
        nargs=2,
        default=[16, 256],
        metavar=("LOW", "HIGH"),
        help="token ids are drawn from [LOW, HIGH); the default is inside every byte-level BPE vocabulary",
    )
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=0, help="requests sent (and not measured) first")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--launch",
        default=None,
        metavar="SERVE_FLAGS",
        help="first start `python -m api serve SERVE_FLAGS` on a free loopback port (ignores --base-url), "
        "measure it, then stop it",
    )
    parser.add_argument("--launch-timeout", type=float, default=600.0, help="seconds to wait for /health")
    return parser


@contextlib.contextmanager
def launched_server(serve_flags: str, timeout: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """Runs `python -m api serve SERVE_FLAGS` on a free loopback port until the block ends (stopping
    it with SIGTERM, then SIGKILL after 60 s); yields its base URL and process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "api", "serve", *shlex.split(serve_flags), "--host", "127.0.0.1"]
    process = subprocess.Popen([*command, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s")
            time.sleep(0.5)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # Raised in the main thread: asyncio.run cancels the clients, and the launched server (if any)
    # is stopped by launched_server's `finally` instead of being left running.
    raise SystemExit(f"benchmarks.serving: stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        print("--num-prompts, --input-len and --output-len must be >= 1", file=sys.stderr)
        return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("--concurrency must be >= 1", file=sys.stderr)
        return 2
    if not args.request_rate > 0:
        print("--request-rate must be > 0", file=sys.stderr)
        return 2
    if args.launch is not None:
        with launched_server(args.launch, args.launch_timeout) as (url, _):
            args.base_url = url
            summary = asyncio.run(run_benchmark(args))
    else:
        summary = asyncio.run(run_benchmark(args))
    print(format_report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
