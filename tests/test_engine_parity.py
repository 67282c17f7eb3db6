"""Greedy parity: whatever the engine batches, chunks, caches or preempts, each request's tokens
equal transformers' own greedy `generate` on that prompt alone (float32)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.generate_oracle import greedy_generate

ARCHS = ["llama", "qwen2", "qwen3"]
MAX_TOKENS = 12
# Sync reads each step's tokens before scheduling the next; async (the CUDA default) reads them one
# step later, feeding decode input ids from the device. Both must give the oracle's tokens.
ASYNC_MODES = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


def _random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the special tokens at the top of the vocabulary so no prompt contains an EOS.
    return [[rng.randrange(10, vocab_size - 10) for _ in range(n)] for n in lengths]


def _engine_tokens(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].token_ids for o in outputs]


def _spy_batches(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """Records, per step, each scheduled request's computed-token count and chunk size."""
    record: list[tuple[list[int], list[int]]] = []
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule

    def spying_schedule():
        batch = schedule()
        record.append((list(batch.starts), list(batch.num_new_tokens)))
        return batch

    scheduler.schedule = spying_schedule
    return record


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, model_dir_factory):
    model_dir = model_dir_factory(request.param)
    lengths = [3, 17, 40, 9, 64, 1, 25, 33, 50]
    llm_probe = AutoModelForCausalLM.from_pretrained(model_dir).config
    prompts = _random_prompts(llm_probe.vocab_size, lengths, seed=len(request.param))
    return model_dir, prompts, greedy_generate(model_dir, prompts, MAX_TOKENS)


def _llm(model_dir, **overrides) -> LLM:
    return LLM(model=str(model_dir), **{"device": "cpu", "dtype": "float32", **overrides})


@ASYNC_MODES
def test_mixed_batch_matches_generate(arch_case, async_scheduling):
    model_dir, prompts, expected = arch_case
    llm = _llm(model_dir, async_scheduling=async_scheduling)
    batches = _spy_batches(llm)
    assert _engine_tokens(llm, prompts, MAX_TOKENS) == expected
    # All prompts really shared forward passes: the first step carried every prompt.
    assert len(batches[0][1]) == len(prompts)
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


@ASYNC_MODES
def test_preemption_keeps_outputs_exact(arch_case, async_scheduling):
    model_dir, prompts, expected = arch_case
    # 8 blocks of 16 tokens cannot hold all 9 sequences at once: the newest must be preempted.
    llm = _llm(
        model_dir, num_kv_blocks=8, block_size=16, enable_prefix_caching=False, async_scheduling=async_scheduling
    )
    assert _engine_tokens(llm, prompts, MAX_TOKENS) == expected
    assert llm.stats()["num_preemptions"] > 0
    assert llm.stats()["kv_blocks_free"] == 8


@ASYNC_MODES
def test_chunked_prefill_keeps_outputs_exact(arch_case, async_scheduling):
    model_dir, prompts, expected = arch_case
    llm = _llm(model_dir, max_num_batched_tokens=16, async_scheduling=async_scheduling)
    batches = _spy_batches(llm)
    assert _engine_tokens(llm, prompts, MAX_TOKENS) == expected
    # Some prompt was computed in several chunks: a step resumed it from a nonzero offset
    # while it still had prompt tokens left.
    assert any(n > 1 and computed > 0 for computed_list, sizes in batches for computed, n in zip(computed_list, sizes))
    assert all(sum(sizes) <= 16 for _, sizes in batches)
    # Decodes and prompt chunks shared steps.
    assert any(1 in sizes and any(n > 1 for n in sizes) for _, sizes in batches)


@ASYNC_MODES
def test_prefix_cache_hits_keep_outputs_exact(model_dir_factory, async_scheduling):
    model_dir = model_dir_factory("qwen3")
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    shared = _random_prompts(vocab, [48], seed=7)[0]
    suffixes = _random_prompts(vocab, [5, 11, 1, 20], seed=8)
    prompts = [shared + s for s in suffixes]
    expected = greedy_generate(model_dir, prompts, MAX_TOKENS)
    llm = _llm(model_dir, block_size=16, async_scheduling=async_scheduling)
    first = _engine_tokens(llm, prompts[:1], MAX_TOKENS)
    assert llm.stats()["prefix_cache_hit_tokens"] == 0
    rest = _engine_tokens(llm, prompts[1:], MAX_TOKENS)
    assert first + rest == expected
    # Each later prompt reused the 3 full blocks of the shared 48-token prefix.
    assert llm.stats()["prefix_cache_hit_tokens"] == 3 * 48
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


@pytest.mark.triton
def test_triton_backend_matches_generate(model_dir_factory):
    """The Triton kernels inside the real model (interpreted on the CPU, native on a GPU)."""
    pytest.importorskip("triton")
    model_dir = model_dir_factory("llama")
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    prompts = _random_prompts(vocab, [5, 21, 2], seed=3)
    expected = greedy_generate(model_dir, prompts, 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton kernels need CUDA tensors there
    # An explicit pool: on a GPU the engine would otherwise profile and take 90% of the card.
    llm = _llm(model_dir, attention_backend="triton", max_num_batched_tokens=16, device=device, num_kv_blocks=64)
    assert _engine_tokens(llm, prompts, 4) == expected
