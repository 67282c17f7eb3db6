"""What a JSON-schema constraint costs: the same requests with and without one, same token counts.

    python -m benchmarks.structured_cost            # the random demo model (demo-random) on the CPU
    python -m benchmarks.structured_cost --model DIR --device cuda

Every request first runs constrained by one JSON schema (its output ends when the JSON is
complete); then the same prompts run unconstrained with `ignore_eos` and max_tokens equal to each
constrained output's length, so both runs generate exactly the same number of tokens. The grammar
is compiled in a warm-up request first (compilation is cached per schema). Both runs use the
nano-vllm sampling temperature 0.6. Needs a model with a tokenizer, and xgrammar.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.workload import make_workload
from engine import LLM, SamplingParams
from engine.sampling.structured_outputs import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
        "score": {"type": "number"},
        "status": {"enum": ["open", "closed", "pending"]},
    },
    "required": ["id", "name", "tags", "score", "status"],
}


def _timed(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list[int]]:
    device = llm.engine.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, [len(o.outputs[0].token_ids) for o in outputs]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="demo-random", help="hub id, directory or built-in name (default: demo-random)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-seqs", type=int, default=48)
    parser.add_argument("--min-input", type=int, default=16)
    parser.add_argument("--max-input", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=400, help="cap on each constrained output")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each kind; the best counts")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)

    # No prefix caching: the unconstrained run reuses the constrained run's prompts, and cache hits
    # would make its prefill free.
    llm = LLM(model=args.model, device=args.device, enable_prefix_caching=False)
    vocab = len(llm.get_tokenizer())
    prompts, _ = make_workload(args.num_seqs, args.min_input, args.max_input, 1, 1, vocab, seed=0)
    constraint = StructuredOutputsParams(json=SCHEMA)
    constrained = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, structured_outputs=constraint
    )
    llm.generate(prompts[:2], constrained)  # warm-up: compiles the grammar, settles the allocator

    best = {"constrained": 0.0, "free": 0.0}
    tokens = 0
    for run in range(args.repeat):
        shifted = [[(t + run + 1) % vocab for t in p] for p in prompts]  # other prompts each run
        seconds, lengths = _timed(llm, shifted, [constrained] * len(prompts))
        free = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True) for n in lengths]
        seconds_free, free_lengths = _timed(llm, shifted, free)
        assert free_lengths == lengths
        tokens = sum(lengths)
        best["constrained"] = max(best["constrained"], tokens / seconds)
        best["free"] = max(best["free"], tokens / seconds_free)
    result = {
        "model": llm.engine.model_name,
        "device": str(llm.engine.device),
        "requests": len(prompts),
        "output_tokens_last_run": tokens,
        "unconstrained_tok_s": best["free"],
        "json_schema_tok_s": best["constrained"],
        "throughput_loss": 1 - best["constrained"] / best["free"],
    }
    print(f"# {result['model']} on {result['device']}: {len(prompts)} requests, {tokens} output tokens (last run)")
    print("| run          | output tok/s |")
    print("|--------------|--------------|")
    print(f"| no schema    | {result['unconstrained_tok_s']:12.1f} |")
    print(f"| JSON schema  | {result['json_schema_tok_s']:12.1f} |")
    print(f"# throughput lost to the constraint: {100 * result['throughput_loss']:.1f}% (target < 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
