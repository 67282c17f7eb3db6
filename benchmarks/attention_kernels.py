"""Microbenchmark of the Triton paged-attention kernel against the torch reference (CUDA only).

    python -m benchmarks.attention_kernels [--seqs 64] [--context 1024] [--prefill 2048] [--sweep]

Decode reads every cached key and value once, so its figure of merit is the achieved bandwidth of
that read; prefill is reported in TFLOP/s of causal attention. --sweep also times fixed tile
configurations, to check the kernel's heuristic.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable

import torch

from engine.attention import reference
from engine.attention.metadata import AttentionMetadata


def make_batch(
    num_seqs: int, query_len: int, context: int, args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """num_seqs sequences of `context` tokens whose last query_len tokens are this step's queries."""
    pages = math.ceil(context / args.block_size)
    num_blocks = num_seqs * pages
    dtype, device = torch.bfloat16, "cuda"
    cache_shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    key_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    value_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    # Shuffled pages, as a long-running cache would hand them out.
    block_tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(num_seqs, pages)
    query = torch.randn(num_seqs * query_len, args.heads, args.head_dim, dtype=dtype, device=device)
    starts = [b * query_len for b in range(num_seqs + 1)]
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs * query_len, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), context, dtype=torch.int32, device=device),
        block_tables=block_tables,
        max_query_len=query_len,
        max_seq_len=context,
        query_start_loc_host=starts,
        seq_lens_host=[context] * num_seqs,
    )
    return query, key_cache, value_cache, metadata


def time_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    fn()  # compile / warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def run_case(
    title: str,
    batch: tuple,
    work: float,
    unit: tuple[str, float],
    sweep: list | None = None,
    split_sweep: list[int] | None = None,
) -> None:
    """Times triton and the reference on one batch; `work` (bytes or FLOPs per call) over the time,
    in units of unit[1], is the figure printed."""
    from engine.attention import triton_attention

    query, key_cache, value_cache, metadata = batch
    scale = query.shape[-1] ** -0.5
    triton_call = lambda: triton_attention.paged_attention(query, key_cache, value_cache, metadata, scale)
    print(title)

    def report(name: str, ms: float) -> None:
        print(f"  {name:<28} {ms * 1e3:10.1f} us  {work / (ms * 1e-3) / unit[1]:8.1f} {unit[0]}")

    triton_ms = time_ms(triton_call)
    report("triton paged_attention", triton_ms)
    reference_ms = time_ms(lambda: reference.paged_attention(query, key_cache, value_cache, metadata, scale), repeats=3)
    report("torch reference", reference_ms)
    print(f"  speed-up over the reference: {reference_ms / triton_ms:.1f}x")
    # Private hooks, overridden one at a time to time fixed choices against the heuristics.
    for hook, choices, name in (
        ("_launch_config", sweep or [], lambda c: f"m{c[0]} n{c[1]} w{c[2]} s{c[3]}"),
        ("_num_kv_splits", split_sweep or [], lambda c: f"{c} kv splits"),
    ):
        default = getattr(triton_attention, hook)
        try:
            for choice in choices:
                setattr(triton_attention, hook, lambda *_, c=choice: c)
                try:
                    report(name(choice), time_ms(triton_call))
                except Exception as error:  # e.g. a tile too big for shared memory
                    print(f"  {name(choice)}: {type(error).__name__}: {str(error)[:80]}")
        finally:
            setattr(triton_attention, hook, default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=2048, help="prompt length of the prefill case; 0: skip")
    parser.add_argument("--heads", type=int, default=16)  # Qwen3-0.6B: 16 query heads, 8 kv heads, 128
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also time fixed tile configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_kernels: no CUDA device; this benchmark times GPU kernels only. Skipping.")
        return
    import triton

    from engine.attention import triton_attention

    config = triton_attention._LaunchConfig
    shape = f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, block {args.block_size}, bf16"
    print(f"{torch.cuda.get_device_name()}: {shape}")

    kv_bytes = 2 * args.seqs * args.context * args.kv_heads * args.head_dim * 2
    block_n = triton_attention._launch_config(
        max(16, triton.next_power_of_2(args.head_dim)),
        triton.next_power_of_2(args.heads // args.kv_heads),
        1,
        torch.bfloat16,
    ).block_n
    splits = triton_attention._num_kv_splits(args.seqs, args.kv_heads, 1, args.context, block_n, torch.device("cuda"))
    decode_sweep = [config(16, *c) for c in itertools.product((32, 64, 128), (2, 4, 8), (2, 3))]
    run_case(
        f"decode: {args.seqs} seqs x {args.context} ctx, KV read {kv_bytes / 1e6:.1f} MB, {splits} kv splits",
        make_batch(args.seqs, 1, args.context, args),
        kv_bytes,
        ("GB/s of KV read", 1e9),
        decode_sweep if args.sweep else None,
        [1, 2, 4, 8, 16, 32] if args.sweep else None,
    )
    if args.prefill:
        num_seqs = 4
        # Causal attention: QK^T and PV over half the square, 2 FLOPs per multiply-add.
        flops = num_seqs * 2 * 2 * args.heads * args.head_dim * args.prefill * (args.prefill + 1) / 2
        prefill_sweep = [config(*c) for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
        run_case(
            f"prefill: {num_seqs} seqs x {args.prefill} prompt tokens",
            make_batch(num_seqs, args.prefill, args.prefill, args),
            flops,
            ("TFLOP/s", 1e12),
            prefill_sweep if args.sweep else None,
        )


if __name__ == "__main__":
    main()
