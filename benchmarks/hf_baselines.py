"""transformers' own generation on the engine's model: static batched `generate` and continuous batching.

Both run on the very model object the engine used (KV cache freed, attention switched to SDPA), so
the comparison is on the same weights."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import time
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from benchmarks.workload import SystemResult, best_of, dummy_engine_config, sync_device


def model_for_transformers(llm) -> torch.nn.Module:
    """The engine's model with the engine gone: its KV cache and CUDA graphs freed, attention on SDPA."""
    model = llm.engine.runner.model
    # Drop the cache first in case something else still holds the engine.
    llm.engine.runner.kv_caches = []
    llm.engine.runner.graph_runner = None
    use_sdpa(model)
    return model


def use_sdpa(model: torch.nn.Module) -> None:
    # set_attn_implementation also updates sub-configs; older versions only read the config field.
    try:
        model.set_attn_implementation("sdpa")
    except (AttributeError, ValueError, ImportError):
        model.config._attn_implementation = "sdpa"
    model.config._attn_implementation = "sdpa"


def load_model_only(args: argparse.Namespace, model_dir: str) -> torch.nn.Module:
    """The model the engine would build (same seed, same weights), without a KV cache or graphs."""
    from engine.execution.loader import load

    config = dummy_engine_config(args, model_dir)
    model = load(config).model
    use_sdpa(model)
    return model


# ---- transformers baselines ----------------------------------------------------------------------


class _Deadline(StoppingCriteria):
    """A stopping criterion for `generate` that ends the batch once the time limit has passed."""

    def __init__(self, deadline: float | None) -> None:
        super().__init__()
        self.deadline = deadline
        self.hit = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = self.deadline is not None and time.perf_counter() > self.deadline
        self.hit = self.hit or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _sampling_config(temperature: float, **kwargs: Any):
    from transformers import GenerationConfig

    # top_k=0 and top_p=1.0 turn off the warpers a model's default generation config may carry, so
    # transformers samples from the same distribution as the engine.
    if temperature > 0:
        return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **kwargs)
    return GenerationConfig(do_sample=False, **kwargs)


def _hf_generate_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    stopping: _Deadline | None = None,
) -> int:
    """One static batch, left-padded; returns how many tokens each row generated."""
    device = model.device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    # min_new_tokens = max_new_tokens: EOS can never end a row early (ignore_eos, as the engine).
    config = _sampling_config(
        temperature, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad_id
    )
    criteria = StoppingCriteriaList([stopping] if stopping is not None else [])
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=criteria,
        )
    return out.shape[1] - width


def run_hf_generate(
    model: torch.nn.Module,
    workloads: list[list[list[int]]],
    output_lens: list[int],
    temperature: float,
    batch_size: int,
    time_limit: float | None,
) -> SystemResult:
    """Static batches in workload order; each runs to its longest requested output."""
    device = model.device
    pad_id = 0  # any id: padded positions are masked out
    _hf_generate_batch(model, [p[:16] for p in workloads[0][:2]], 4, temperature, pad_id)
    runs = []
    for prompts in workloads:
        load_before = os.getloadavg()[0]
        sync_device(device)
        start = time.perf_counter()
        deadline = _Deadline(None if time_limit is None else start + time_limit)
        useful = 0
        batches_done = 0
        num_batches = math.ceil(len(prompts) / batch_size)
        for first in range(0, len(prompts), batch_size):
            batch_prompts = prompts[first : first + batch_size]
            batch_outputs = output_lens[first : first + batch_size]
            generated = _hf_generate_batch(model, batch_prompts, max(batch_outputs), temperature, pad_id, deadline)
            # Only the tokens a request asked for are useful; the rest is static batching's padding.
            useful += sum(min(n, generated) for n in batch_outputs)
            batches_done += 1
            if deadline.hit:
                break
        sync_device(device)
        seconds = time.perf_counter() - start
        note = f"batch size {batch_size}"
        if device.type == "cpu":
            note += f"; load {load_before:.1f}"
        if deadline.hit:
            note += f"; stopped at the {time_limit:.0f} s limit in batch {batches_done}/{num_batches}"
        runs.append(SystemResult("hf-generate", useful, seconds, note=note, partial=deadline.hit))
        if deadline.hit:
            break  # out of time: no further repeats
    return best_of(runs)


def _init_cb_manager(model: torch.nn.Module, temperature: float, prompts: list[list[int]], output_lens: list[int]):
    """transformers' continuous batching manager, across the API changes from 5.17 on."""
    config = _sampling_config(temperature, max_new_tokens=max(output_lens), pad_token_id=0)
    config.eos_token_id = -1  # no EOS: requests run to their own max_new_tokens (ignore_eos)
    kwargs: dict[str, Any] = {"generation_config": config}
    accepted = inspect.signature(model.init_continuous_batching).parameters
    if "workload_hints" in accepted:
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints

            hint_fields = inspect.signature(WorkloadHints).parameters
            hints = {
                "max_prompt_length": max(len(p) for p in prompts),
                "max_generated_length": max(output_lens),
                "num_requests": len(prompts),
            }
            kwargs["workload_hints"] = WorkloadHints(**{k: v for k, v in hints.items() if k in hint_fields})
        except ImportError:
            pass
    return model.init_continuous_batching(**kwargs)


def _stop_cb_manager(manager) -> None:
    try:
        manager.stop(block=True, timeout=30)
    finally:
        if hasattr(manager, "destroy"):
            manager.destroy()


def run_hf_generate_batch(
    model: torch.nn.Module,
    workloads: list[list[list[int]]],
    output_lens: list[int],
    temperature: float,
    time_limit: float | None,
) -> SystemResult:
    """transformers' continuous batching, each request with its own max_new_tokens (the manager API;
    `generate_batch` itself takes one max_new_tokens for all requests)."""
    device = model.device
    manager = _init_cb_manager(model, temperature, workloads[0], output_lens)
    runs = []
    try:
        if hasattr(manager, "warmup"):
            manager.warmup()  # captures its CUDA graphs; not timed, as the engine's capture is not
        manager.start()
        warmup_ids = [
            manager.add_request(input_ids=p[:16], request_id=f"warmup-{i}", max_new_tokens=4, eos_token_id=-1)
            for i, p in enumerate(workloads[0][:2])
        ]
        _collect_cb_results(manager, set(warmup_ids), time.perf_counter() + 300)
        for repeat, prompts in enumerate(workloads):
            run = _timed_cb_run(manager, prompts, output_lens, time_limit, device, tag=f"r{repeat}")
            runs.append(run)
            if run.partial:
                break
    finally:
        _stop_cb_manager(manager)
    return best_of(runs)


def _timed_cb_run(
    manager,
    prompts: list[list[int]],
    output_lens: list[int],
    time_limit: float | None,
    device: torch.device,
    tag: str,
) -> SystemResult:
    load_before = os.getloadavg()[0]
    sync_device(device)
    start = time.perf_counter()
    requested = {}
    for i, (prompt, num_out) in enumerate(zip(prompts, output_lens)):
        request_id = manager.add_request(
            input_ids=prompt, request_id=f"bench-{tag}-{i}", max_new_tokens=num_out, eos_token_id=-1
        )
        if request_id is None:
            raise RuntimeError("the continuous batching manager refused a request")
        requested[request_id] = num_out
    deadline = None if time_limit is None else start + time_limit
    results, reason = _collect_cb_results(manager, set(requested), deadline)
    sync_device(device)
    seconds = time.perf_counter() - start
    errors = [r.error for r in results.values() if getattr(r, "error", None)]
    finished_ok = [rid for rid, r in results.items() if not getattr(r, "error", None)]
    tokens = sum(min(len(results[rid].generated_tokens), requested[rid]) for rid in finished_ok)
    partial = len(finished_ok) < len(requested)
    notes = []
    if partial:
        unfinished = {rid: n for rid, n in requested.items() if rid not in results}
        in_flight = _in_flight_tokens(manager, unfinished)
        if in_flight is None:
            counted = "their tokens not counted"
        else:
            tokens += in_flight
            counted = f"{in_flight} tokens of theirs counted"
        notes.append(f"{len(finished_ok)}/{len(requested)} requests finished ({reason}); {counted}")
        for rid in unfinished:
            with contextlib.suppress(Exception):
                manager.cancel_request(rid)
    if errors:
        notes.append(f"{len(errors)} failed: {errors[0]}")
    if device.type == "cpu":
        notes.append(f"load {load_before:.1f}")
    return SystemResult("hf-generate-batch", tokens, seconds, note="; ".join(notes), partial=partial)


def _in_flight_tokens(manager, unfinished: dict[str, int]) -> int | None:
    """Tokens generated so far by requests still running in transformers' manager, read from its
    scheduler's state (internals that differ between versions: None when they cannot be read)."""
    try:
        states = dict(manager.batch_processor.scheduler.active_requests)
    except AttributeError:
        return None
    total = 0
    for rid, state in states.items():
        if rid in unfinished:
            generated = getattr(state, "generated_tokens", None) or getattr(state, "static_outputs", None) or []
            total += min(len(generated), unfinished[rid])
    return total


def _collect_cb_results(manager, pending: set[str], deadline: float | None) -> tuple[dict[str, Any], str]:
    results: dict[str, Any] = {}
    pending = set(pending)
    while pending:
        if deadline is not None and time.perf_counter() > deadline:
            return results, "time limit"
        result = manager.get_result(timeout=0.5)
        if result is None:
            if not manager.is_running():
                return results, "its generation thread stopped"
            continue
        if result.request_id in pending and result.is_finished():
            results[result.request_id] = result
            pending.discard(result.request_id)
    return results, "done"
