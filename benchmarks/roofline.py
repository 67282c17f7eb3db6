"""The roofline bound of the offline workload on one card.

A decode step must at least read every weight once and the KV cache of every running sequence;
prefill must at least do 2 FLOPs per non-embedding parameter per prompt token. The bound is

    sum over decode steps of (weight bytes + KV bytes of the running sequences) / bandwidth
    + prefill FLOPs / matmul rate

with bandwidth and matmul rate measured on the card itself (a large device-to-device copy and a
large bf16 GEMM). Nothing can beat it; the share of it an engine reaches is the headline number.

`python -m benchmarks.roofline --preset qwen3-0.6b --bandwidth 3.35e12 --matmul-rate 989e12`
prints the bound from a config alone (the model is built on the meta device), to check the
arithmetic against the datasheet of a card without having one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# ---- what the model costs -------------------------------------------------------------------------


@dataclass
class ModelCosts:
    weight_bytes: int  # bytes a decode step reads: every parameter but an untied input embedding
    prefill_params: int  # parameters a prompt token passes through as a matmul (no embedding, no LM head)
    kv_bytes_per_token: int  # K and V of one token over all layers


def model_costs(model: torch.nn.Module, kv_dtype: torch.dtype | None = None) -> ModelCosts:
    """Costs of a transformers causal LM (works on the meta device: only shapes are read)."""
    input_embedding = model.get_input_embeddings().weight
    output_embeddings = model.get_output_embeddings()
    lm_head = output_embeddings.weight if output_embeddings is not None else None
    tied = lm_head is not None and lm_head is input_embedding
    weight_bytes = 0
    prefill_params = 0
    # parameters() yields a tied weight once, so a tied embedding/LM head counts once.
    for parameter in model.parameters():
        if parameter is input_embedding and not tied:
            # An untied embedding table is gathered, a few rows per step, never read whole.
            continue
        weight_bytes += parameter.numel() * parameter.element_size()
        if parameter is not input_embedding and parameter is not lm_head:
            # The LM head runs on one row per sequence, not on every prompt token.
            prefill_params += parameter.numel()
    text_config = model.config.get_text_config()
    num_kv_heads = text_config.num_key_value_heads or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or (text_config.hidden_size // text_config.num_attention_heads)
    element_size = torch.empty((), dtype=kv_dtype or input_embedding.dtype).element_size()
    kv_bytes_per_token = 2 * text_config.num_hidden_layers * num_kv_heads * head_dim * element_size
    return ModelCosts(weight_bytes, prefill_params, kv_bytes_per_token)


# ---- what the card can do -------------------------------------------------------------------------


def _best_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # first call pays for allocation and kernel selection
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device, num_bytes: int = 2 << 30, repeats: int = 5) -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written)."""
    seconds = _time_copy(device, num_bytes, repeats)
    torch.cuda.empty_cache()  # the buffers are gone with _time_copy's frame; give their memory back
    return 2 * num_bytes / seconds


def _time_copy(device: torch.device, num_bytes: int, repeats: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), repeats, device)


def measure_matmul_rate(
    device: torch.device, size: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 5
) -> float:
    """FLOPs per second of a large square GEMM (several per timing so launch cost vanishes)."""
    per_timing = 5
    seconds = _time_matmuls(device, size, dtype, repeats, per_timing)
    torch.cuda.empty_cache()
    return per_timing * 2 * size**3 / seconds


def _time_matmuls(device: torch.device, size: int, dtype: torch.dtype, repeats: int, per_timing: int) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)

    def run() -> None:
        for _ in range(per_timing):
            torch.matmul(a, b, out=out)

    return _best_seconds(run, repeats, device)


# ---- the workload against both ----------------------------------------------------------------


@dataclass
class Bound:
    seconds: float
    output_tokens: int
    tokens_per_s: float
    decode_steps: int
    decode_seconds: float
    prefill_seconds: float
    weight_bytes_read: float
    kv_bytes_read: float
    max_concurrent_seqs: int
    bandwidth: float
    matmul_rate: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def workload_bound(
    input_lens: list[int],
    output_lens: list[int],
    costs: ModelCosts,
    bandwidth: float,
    matmul_rate: float,
    kv_capacity_tokens: int | None = None,
    max_num_seqs: int | None = None,
    block_size: int = 16,
) -> Bound:
    """The fastest the workload can possibly run: decode traffic over bandwidth plus prefill compute.

    All sequences decode together when the KV cache holds them; otherwise they are admitted in
    order whenever their whole length fits (waves of what fits), as the engine would keep them.
    A sequence's first output token comes from its prefill, so it takes output_len - 1 decode steps;
    at its k-th decode step it reads the K/V of input_len + k tokens.
    """
    capacity_blocks = None if kv_capacity_tokens is None else kv_capacity_tokens // block_size
    seq_cap = max_num_seqs or len(input_lens)
    waiting = deque(range(len(input_lens)))
    running: dict[int, int] = {}  # sequence -> decode steps done
    free_blocks = capacity_blocks
    blocks_of = [-(-(i + o) // block_size) for i, o in zip(input_lens, output_lens)]
    steps = 0
    kv_tokens_read = 0
    max_concurrent = 0
    while waiting or running:
        while waiting and len(running) < seq_cap:
            candidate = waiting[0]
            if free_blocks is not None and blocks_of[candidate] > free_blocks:
                if not running:
                    raise ValueError(f"sequence {candidate} needs more KV blocks than the whole cache holds")
                break
            waiting.popleft()
            if free_blocks is not None:
                free_blocks -= blocks_of[candidate]
            running[candidate] = 0
        max_concurrent = max(max_concurrent, len(running))
        done = [seq for seq, k in running.items() if k >= output_lens[seq] - 1]
        for seq in done:
            del running[seq]
            if free_blocks is not None:
                free_blocks += blocks_of[seq]
        if not running:
            continue
        steps += 1
        for seq in running:
            running[seq] += 1
            kv_tokens_read += input_lens[seq] + running[seq]
    weight_bytes_read = float(steps) * costs.weight_bytes
    kv_bytes_read = float(kv_tokens_read) * costs.kv_bytes_per_token
    decode_seconds = (weight_bytes_read + kv_bytes_read) / bandwidth
    prefill_seconds = 2.0 * costs.prefill_params * sum(input_lens) / matmul_rate
    seconds = decode_seconds + prefill_seconds
    output_tokens = sum(output_lens)
    return Bound(
        seconds=seconds,
        output_tokens=output_tokens,
        tokens_per_s=output_tokens / seconds,
        decode_steps=steps,
        decode_seconds=decode_seconds,
        prefill_seconds=prefill_seconds,
        weight_bytes_read=weight_bytes_read,
        kv_bytes_read=kv_bytes_read,
        max_concurrent_seqs=max_concurrent,
        bandwidth=bandwidth,
        matmul_rate=matmul_rate,
    )


# ---- a config alone, for checking the arithmetic ----------------------------------------------


def meta_model(config_path: str | Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The architecture of a config.json with no storage behind its parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(Path(config_path).read_text()))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.workload import PRESETS, make_workload

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu_presets = [name for name, preset in PRESETS.items() if preset.config_file]
    parser.add_argument("--preset", choices=gpu_presets, default="qwen3-0.6b")
    parser.add_argument("--bandwidth", type=float, help="bytes/s (default: measure on CUDA)")
    parser.add_argument("--matmul-rate", type=float, help="FLOP/s (default: measure on CUDA)")
    parser.add_argument("--kv-capacity-tokens", type=int, help="KV cache size in tokens (default: unlimited)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.bandwidth is None or args.matmul_rate is None:
        if not torch.cuda.is_available():
            parser.error("without CUDA, pass --bandwidth and --matmul-rate (H100 SXM datasheet: 3.35e12, 989e12)")
        device = torch.device("cuda")
        args.bandwidth = args.bandwidth or measure_bandwidth(device)
        args.matmul_rate = args.matmul_rate or measure_matmul_rate(device)
    costs = model_costs(meta_model(preset.config_file))
    prompts, output_lens = make_workload(
        preset.num_seqs, preset.min_input, preset.max_input, preset.min_output, preset.max_output, 10_000
    )
    input_lens = [len(p) for p in prompts]
    bound = workload_bound(input_lens, output_lens, costs, args.bandwidth, args.matmul_rate, args.kv_capacity_tokens)
    print(json.dumps({"preset": args.preset, "costs": asdict(costs), "bound": bound.as_dict()}, indent=2))
    print(f"bound: {bound.tokens_per_s:,.0f} output tok/s ({bound.seconds:.2f} s, {bound.output_tokens} tokens)")


if __name__ == "__main__":
    main()
