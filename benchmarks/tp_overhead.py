"""What tensor parallelism adds to a step, measured on the CPU (gloo): step-input transport, all-reduce,
transformers' per-layer TP wrappers, and whole decode steps at TP=1 and TP=N.

    python -m benchmarks.tp_overhead [--tensor-parallel-size 2] [--json out.json]

The transport and all-reduce numbers come from two bare gloo processes running the engine's own
`StepSender`/`StepReceiver`, at the packed sizes of decode steps (4 int64 per row; query starts,
lengths and a block table of ceil(context / 16) int32 per row, all in one int32 tensor). The engine numbers run the demo
model (random weights) with dummy prompts. NCCL cannot be measured on a one-GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (rows, context) of the decode steps whose inputs are sent; 16-token blocks.
TRANSPORT_CASES = [(1, 512), (32, 2048), (256, 2048), (256, 32768)]
ALL_REDUCE_ROWS = [1, 32, 256]
BLOCK_SIZE = 16


def packed_size(rows: int, context: int) -> int:
    """int32 count of a decode step's packed inputs (see model_runner.unpack_step): 4 int64 per row,
    then query starts, lengths and block tables."""
    return 2 * 4 * rows + (rows + 1) + rows + rows * -(-context // BLOCK_SIZE)


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _microbench(rank: int, world_size: int, port: int, hidden: int, iterations: int, out: dict) -> None:
    from engine.parallel.group import init_group
    from engine.parallel.transport import StepReceiver, StepSender

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group = init_group(rank, world_size, rank, "cpu")
    results: dict[str, Any] = {"transport_us": {}, "all_reduce_us": {}}
    for rows, context in TRANSPORT_CASES:
        packed = torch.zeros(packed_size(rows, context), dtype=torch.int32)
        samples = []
        for _ in range(iterations):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                StepSender(group).send([rows, rows, 0, rows, 0, 1, context, 0], packed)
            else:
                StepReceiver(group).receive()
            samples.append(time.perf_counter() - start)
        results["transport_us"][f"{rows}x{context}"] = {
            "us": _median_us(samples),
            "bytes": 4 * packed.numel(),
        }
    for rows in ALL_REDUCE_ROWS:
        tensor = torch.randn(rows, hidden)
        samples = []
        for _ in range(iterations):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - start)
        results["all_reduce_us"][str(rows)] = _median_us(samples)
    if rank == 0:
        out.update(results)
    group.destroy()


def measure_collectives(world_size: int, hidden: int, iterations: int) -> dict[str, Any]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_microbench, args=(world_size, port, hidden, iterations, out), nprocs=world_size, join=True)
    return dict(out)


def _decode_step_seconds(llm, rows: int, steps: int) -> tuple[float, float]:
    """(mean seconds per decode step, of which sending the step's inputs) with `rows` sequences."""
    from engine import SamplingParams

    engine = llm.engine
    for i in range(rows):
        engine.add_request(f"r{rows}-{i}", [11 + i] * 16, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    engine.step()  # the prefill
    engine.step()
    sent = [0.0]
    sender = engine.runner.step_sender
    if sender is not None:
        send = sender.send

        def timed_send(*args):
            start = time.perf_counter()
            send(*args)
            sent[0] += time.perf_counter() - start

        sender.send = timed_send
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = (time.perf_counter() - start) / steps
    if sender is not None:
        sender.send = send
    while engine.has_unfinished_requests():
        engine.step()
    return seconds, sent[0] / steps


def _colwise_wrapper_us(llm, rows: int, iterations: int = 2000) -> float:
    """transformers' TP forward of a column-parallel Linear minus the bare matmul on the local shard
    (no collective inside, so rank 0 can time it alone)."""
    projection = llm.engine.runner.model.model.layers[0].self_attn.q_proj
    local = projection.weight.to_local()
    x = torch.randn(rows, local.shape[1])

    def best(fn) -> float:
        samples = []
        with torch.inference_mode():
            for _ in range(iterations):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
        return _median_us(samples)

    return best(lambda: projection(x)) - best(lambda: torch.nn.functional.linear(x, local))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from engine import LLM
    from engine.models.demo_model import DEMO_MODEL_DIMS

    report: dict[str, Any] = {"load_average": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    report.update(measure_collectives(args.tensor_parallel_size, DEMO_MODEL_DIMS["hidden_size"], args.iterations))
    settings = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 256, "max_model_len": 512}
    engines: dict[str, Any] = {}
    for size in (1, args.tensor_parallel_size):
        llm = LLM(tensor_parallel_size=size, **settings)
        for rows in (1, 32):
            step, sent = _decode_step_seconds(llm, rows, args.steps)
            engines[f"tp{size}_rows{rows}"] = {"step_ms": step * 1e3, "send_ms": sent * 1e3}
        if size > 1:
            engines["colwise_wrapper_us"] = {rows: _colwise_wrapper_us(llm, rows) for rows in (1, 32)}
        llm.shutdown()
    report["engine"] = engines
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
