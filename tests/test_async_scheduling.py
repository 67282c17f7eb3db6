"""Async scheduling: step N+1 is scheduled and launched before step N's tokens are read.

The oracle is the synchronous engine (itself checked against transformers' `generate` in the
parity tests): on the same workload, with every random row seeded, both modes must give the same
tokens, text, finish reasons and logprobs. The other tests check that the overlap really happens,
that it stops where sampling needs the previous token on the host, and that it wastes no work at
max_tokens.
"""

from __future__ import annotations

import importlib.util
import re

import openai
import pytest

from engine import LLM, SamplingParams
from engine.execution.model_runner import LaunchedStep
from engine.sampling.structured_outputs import StructuredOutputsParams

TEXT_PROMPTS = ["Héllo wörld", "The quick brown fox jumps over", "Ж", "🚀 ünïcödé story time, once upon a"]


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("qwen3")


def _llm(model_dir, async_scheduling: bool, **settings) -> LLM:
    return LLM(model=str(model_dir), device="cpu", dtype="float32", async_scheduling=async_scheduling, **settings)


def _record_order(llm: LLM) -> list[tuple[str, int]]:
    """Records ("launch", k) when step k's forward pass is queued and ("result", k) when its tokens
    are read."""
    events: list[tuple[str, int]] = []
    runner = llm.engine.runner
    launch_forward, launch_sampling = runner.launch_forward, runner.launch_sampling

    def recording_forward(batch):
        events.append(("launch", sum(1 for kind, _ in events if kind == "launch")))
        return launch_forward(batch)

    def recording_sampling(forward) -> LaunchedStep:
        launched = launch_sampling(forward)
        index = sum(1 for kind, _ in events if kind == "launch") - 1
        result = launched.result
        launched.result = lambda: (events.append(("result", index)), result())[1]
        return launched

    runner.launch_forward, runner.launch_sampling = recording_forward, recording_sampling
    return events


def _workload(llm: LLM, eos_id: int) -> tuple[list, list[SamplingParams]]:
    tokenizer = llm.get_tokenizer()
    token_prompts = [tokenizer.encode(p, add_special_tokens=False) for p in TEXT_PROMPTS]
    # A stop id that the greedy output really produces mid-stream, so the step after it is in flight.
    (probe,) = llm.generate([token_prompts[1]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stop_id = probe.outputs[0].token_ids[4]
    prompts = TEXT_PROMPTS + token_prompts
    stop_at_id = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True)
    params = [  # the stop id lands on both forms of the probed prompt (indices 1 and 5)
        SamplingParams(temperature=1.0, seed=1, max_tokens=15, logprobs=3, n=2),
        stop_at_id,
        SamplingParams(temperature=0.8, top_p=0.9, seed=2, max_tokens=9, logit_bias={eos_id: 6.0}),
        SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=18, stop=["e", "a"]),
        SamplingParams(temperature=1.0, seed=4, max_tokens=11, repetition_penalty=1.3, presence_penalty=0.5),
        stop_at_id,
        SamplingParams(temperature=0.7, min_p=0.1, seed=5, max_tokens=13, min_tokens=4, logit_bias={eos_id: 100.0}),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0),
    ]
    return prompts, params


def _summary(outputs) -> tuple[list, list[float]]:
    """What must match exactly (ids, text, reasons), and the logprob values, which batches of other
    shapes change in the last bits of their float sums."""
    exact, values = [], []
    for out in outputs:
        for c in out.outputs:
            logprobs = c.logprobs or []
            exact.append(
                (
                    c.token_ids,
                    c.text,
                    c.finish_reason,
                    c.stop_reason,
                    [[t for t, _ in e.top_logprobs] for e in logprobs],
                )
            )
            values += [v for e in logprobs for v in (e.logprob, *(v for _, v in e.top_logprobs))]
    return exact, values


def test_async_gives_what_sync_gives_under_chunking_and_preemption(model_dir):
    # A small pool and token budget: prompts are chunked, sequences preempted and recomputed, with
    # steps in flight all the while.
    settings = {"num_kv_blocks": 10, "block_size": 8, "max_num_batched_tokens": 24}
    sync_llm, async_llm = _llm(model_dir, False, **settings), _llm(model_dir, True, **settings)
    (eos_id,) = sync_llm.engine.eos_token_ids
    prompts, params = _workload(sync_llm, eos_id)
    expected, expected_values = _summary(sync_llm.generate(prompts, params))
    order = _record_order(async_llm)
    got, values = _summary(async_llm.generate(prompts, params))
    assert got == expected
    assert values == pytest.approx(expected_values, abs=1e-4)
    # The workload exercised what it meant to: a stop id, a stop string, EOS and max_tokens.
    reasons = {(c[2], type(c[3]).__name__) for c in expected}
    assert {("stop", "int"), ("stop", "str"), ("stop", "NoneType"), ("length", "NoneType")} <= reasons
    assert async_llm.stats()["num_preemptions"] > 0
    assert async_llm.stats()["kv_blocks_free"] == async_llm.stats()["kv_blocks_total"]
    # Steps overlapped once the sequences whose sampling needs the previous token had finished.
    assert any(a[0] == "launch" and b == ("result", a[1] - 1) for a, b in zip(order, order[1:]))


def test_a_step_is_launched_before_the_previous_steps_tokens_are_read(model_dir):
    llm = _llm(model_dir, True)
    order = _record_order(llm)
    prompts = [[11 + i] * (3 + i) for i in range(4)]
    llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True))
    launches = [k for kind, k in order if kind == "launch"]
    # Steady state: every step k+1 is queued before step k's tokens are read (decode inputs come
    # from step k's sampled tokens on the device).
    assert len(launches) == 6
    for k in launches[:-1]:
        assert order.index(("launch", k + 1)) < order.index(("result", k))


@pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")
def test_a_grammar_keeps_the_overlap_and_its_outputs(model_dir):
    # The forward pass of step k+1 is queued before step k's tokens are read; its sampling waits
    # for them, so the matcher has advanced when it builds the next mask.
    constraint = StructuredOutputsParams(regex="[a-z]{3,20}( [a-z]{3,20}){2,4}")
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=constraint) for s in (1, 2)]
    prompts = [[11] * 4, [12] * 5]
    expected = [o.outputs[0].text for o in _llm(model_dir, False).generate(prompts, params)]
    llm = _llm(model_dir, True)
    order = _record_order(llm)
    assert [o.outputs[0].text for o in llm.generate(prompts, params)] == expected
    assert all(re.fullmatch(constraint.regex, text) for text in expected)
    assert any(a[0] == "launch" and b == ("result", a[1] - 1) for a, b in zip(order, order[1:]))


def test_penalties_count_the_previous_token_and_keep_the_overlap(model_dir):
    # Greedy with a strong frequency penalty: a token left out of the counts would likely be picked
    # again at once. Sync scheduling is the oracle.
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0, min_tokens=3)
    prompts = [[11] * 4, [12, 13, 14, 15, 16]]
    (expected, expected_2) = _llm(model_dir, False).generate(prompts, params)
    llm = _llm(model_dir, True)
    order = _record_order(llm)
    got, got_2 = llm.generate(prompts, params)
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert got_2.outputs[0].token_ids == expected_2.outputs[0].token_ids
    assert any(a[0] == "launch" and b == ("result", a[1] - 1) for a, b in zip(order, order[1:]))


def test_no_token_past_max_tokens_is_computed(model_dir):
    llm = _llm(model_dir, True)
    scheduled = []
    schedule = llm.engine.scheduler.schedule

    def counting_schedule():
        batch = schedule()
        scheduled.append(sum(batch.num_new_tokens))
        return batch

    llm.engine.scheduler.schedule = counting_schedule
    prompts = [[11 + i] * (3 + 2 * i) for i in range(5)]
    max_tokens = [1, 2, 5, 8, 3]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outputs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == max_tokens
    # Each sequence runs its prompt plus every output token but the last through the model, once.
    assert sum(scheduled) == sum(len(p) + m - 1 for p, m in zip(prompts, max_tokens))


def test_streams_over_the_api_match_sync_output(serve_tiny_model):
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 12,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    texts = []
    for async_scheduling in (False, True):
        with serve_tiny_model("tiny-async", async_scheduling=async_scheduling) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
            stream = client.chat.completions.create(model="tiny-async", stream=True, **body)
            deltas = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
            assert sum(1 for d in deltas if d) > 1  # tokens came as they were made, not at the end
            texts.append("".join(deltas))
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_blocks_filled_by_generated_tokens_are_cached(model_dir, async_scheduling):
    """A block is offered to the prefix cache once its tokens are both computed and known on the
    host; with async scheduling the second can come a step after the first."""
    llm = _llm(model_dir, async_scheduling, block_size=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompt = [11 + i for i in range(10)]
    (first,) = llm.generate([prompt], greedy)
    # 10 prompt + 30 generated tokens: blocks 0 and 1 are full and computed (the last token never is).
    follow_up = prompt + first.outputs[0].token_ids[:26]
    (second,) = llm.generate([follow_up], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert llm.stats()["prefix_cache_hit_tokens"] == 32
    (fresh,) = _llm(model_dir, async_scheduling, enable_prefix_caching=False).generate(
        [follow_up], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    )
    assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
