"""Numeric edges of SamplingParams (the offline API's own validation) and the KV-block admission check."""

from __future__ import annotations

import math

import pytest

from engine import LLM, SamplingParams
from engine.sampling.sampling_params import GREEDY_TEMPERATURE_EPS, MAX_REPETITION_PENALTY, MAX_STOP_STRINGS

BLOCK_SIZE = 16
NUM_KV_BLOCKS = 4  # 64 slots of K/V


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("llama")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": math.nan}, "min_p"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"repetition_penalty": 1e308}, "repetition_penalty"),
        ({"repetition_penalty": MAX_REPETITION_PENALTY * 1.01}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        ({"n": True}, "n"),
        ({"n": 2.0}, "n"),
        ({"top_k": 1e30}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"max_tokens": 4.5}, "max_tokens"),
        ({"min_tokens": False}, "min_tokens"),
        ({"logprobs": True}, "logprobs"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": True}, "temperature"),
        ({"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, "stop"),
        ({"stop": [5]}, "stop"),
    ],
)
def test_non_finite_and_wrongly_typed_numbers_are_refused_naming_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=f"Invalid value for '{param}'"):
        SamplingParams(**kwargs)


def test_the_bounds_themselves_are_accepted():
    SamplingParams(repetition_penalty=MAX_REPETITION_PENALTY, top_k=10**30, seed=2**63 - 1, n=3)
    SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)])


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, GREEDY_TEMPERATURE_EPS / 2])
def test_a_temperature_below_the_epsilon_samples_greedily(model_dir, temperature):
    # Before, logits / 1e-45 overflowed to inf, softmax gave NaN, and every step emitted token 0.
    assert SamplingParams(temperature=temperature).greedy
    llm = _llm(model_dir)
    prompts = ["The quick brown fox", "Héllo wörld"]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    tiny = llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=12, ignore_eos=True, seed=1))
    for expected, got in zip(greedy, tiny, strict=True):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
        assert len(set(got.outputs[0].token_ids)) > 1  # not one token repeated (the NaN symptom)


def test_a_temperature_at_the_epsilon_still_samples():
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE_EPS).greedy


def _llm(model_dir, **overrides) -> LLM:
    settings = {"device": "cpu", "dtype": "float32", "block_size": BLOCK_SIZE, "num_kv_blocks": NUM_KV_BLOCKS}
    return LLM(model=str(model_dir), **{**settings, **overrides})


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_request_that_fits_the_pool_exactly_is_accepted_and_completes(model_dir, async_scheduling):
    # 40 prompt tokens + 25 sampled = 65 tokens, but the 25th sampled token is never fed back, so
    # K/V is needed for 64 tokens: exactly the 4 blocks of 16. Two such requests at once must also
    # both finish (the second waits, or is preempted and recomputed, never deadlocks).
    llm = _llm(model_dir, async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    prompts = [list(range(100, 140)), list(range(200, 240))]
    alone = llm.generate(prompts[:1], params)[0].outputs[0]
    assert len(alone.token_ids) == 25 and alone.finish_reason == "length"
    both = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in both] == [25, 25]
    assert both[0].outputs[0].token_ids == alone.token_ids
    stats = llm.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_one_token_more_than_the_pool_is_refused(model_dir):
    llm = _llm(model_dir)
    with pytest.raises(ValueError, match="'max_tokens'.*needs 5 KV blocks.*has 4"):
        llm.generate([list(range(100, 140))], SamplingParams(max_tokens=26))
