"""Engine behaviour: stopping rules, text, n, seeds, logprobs, validation and block accounting."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("qwen3")


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(model_dir, request):
    """The same rules must hold whether a step's tokens are read before the next step is scheduled
    or one step later (async scheduling, the default on CUDA)."""
    return LLM(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_model_len=256,
        num_kv_blocks=64,
        async_scheduling=request.param,
    )


@pytest.fixture
def eos_id(llm):
    (eos,) = llm.engine.eos_token_ids
    return eos


PROMPT = "Héllo wörld, καλημέρα 世界"


def _all_blocks_free(llm: LLM) -> bool:
    stats = llm.stats()
    return stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0


def test_max_tokens_ends_with_length(llm):
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 7
    assert out.outputs[0].finish_reason == "length" and out.finished
    assert _all_blocks_free(llm)


def test_text_equals_full_decode_of_ids(llm):
    tokenizer = llm.get_tokenizer()
    outs = llm.generate([PROMPT, "🚀 ünïcödé", "Ж"], SamplingParams(temperature=1.0, seed=3, max_tokens=40))
    for out in outs:
        completion = out.outputs[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_eos_stops_unless_min_tokens_or_ignore_eos(llm, eos_id):
    push_eos = {eos_id: 100.0}
    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=10, logit_bias=push_eos))
    assert out.outputs[0].token_ids == [eos_id] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason is None

    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=10, min_tokens=4, logit_bias=push_eos))
    ids = out.outputs[0].token_ids
    assert eos_id not in ids[:4] and ids[4] == eos_id and len(ids) == 5

    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, logit_bias=push_eos))
    assert out.outputs[0].token_ids == [eos_id] * 6 and out.outputs[0].finish_reason == "length"


def test_stop_token_ids_end_the_output(llm):
    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=10, stop_token_ids=[77], logit_bias={77: 100.0}))
    assert out.outputs[0].token_ids == [77]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == 77


def test_stop_string_across_token_boundary(llm):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    (free_run,) = llm.generate(PROMPT, params)
    ids = free_run.outputs[0].token_ids
    # Find a token boundary with whole characters on both sides, and a stop string straddling it.
    stop = None
    for k in range(2, len(ids) - 2):
        before = tokenizer.decode(ids[:k])
        after = tokenizer.decode(ids[: k + 1])
        new = after[len(before) :]
        if not after.startswith(before) or not new or "\ufffd" in new + before[-1]:
            continue
        if before[-1] + new[0] not in before:
            stop = before[-1] + new[0]
            break
    assert stop is not None, "the free run should contain a clean token boundary"
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))
    completion = out.outputs[0]
    assert completion.text == before[:-1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop

    with_stop = SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    (out,) = llm.generate(PROMPT, with_stop)
    assert out.outputs[0].text == before[:-1] + stop


def test_n_samples_share_the_prompt_blocks(llm):
    prompt = list(range(100, 170))  # 70 tokens: 4 full blocks of 16
    before = llm.stats()["prefix_cache_hit_tokens"]
    (out,) = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8))
    assert sorted(c.index for c in out.outputs) == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Samples 1 and 2 reused the 4 prompt blocks sample 0 computed.
    assert llm.stats()["prefix_cache_hit_tokens"] - before == 2 * 64
    assert _all_blocks_free(llm)


def test_seeded_output_does_not_depend_on_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    (alone,) = llm.generate(PROMPT, seeded)
    others = [SamplingParams(temperature=1.0, max_tokens=12)] * 5
    crowd = llm.generate(["a", "bb", PROMPT, "ccc", "dd", "e"], others[:2] + [seeded] + others[2:])
    assert crowd[2].outputs[0].token_ids == alone.outputs[0].token_ids


def test_logprobs_come_from_the_raw_distribution(llm, model_dir):
    prompt = [5, 17, 300, 42]
    (out,) = llm.generate([prompt], SamplingParams(temperature=0.8, top_k=5, seed=2, max_tokens=1, logprobs=3))
    (entry,) = out.outputs[0].logprobs
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        raw = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], dim=-1)
    assert entry.token_id == out.outputs[0].token_ids[0]
    assert entry.logprob == pytest.approx(raw[entry.token_id].item(), abs=1e-4)
    top = torch.topk(raw, 3)
    assert [t for t, _ in entry.top_logprobs] == top.indices.tolist()
    assert [lp for _, lp in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_chat_applies_the_template(llm):
    tokenizer = llm.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    (out,) = llm.chat(messages, SamplingParams(max_tokens=3))
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(expected)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logit_bias": {3: 200}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=f"'{param}'"):
        SamplingParams(**kwargs)


def test_requests_that_can_never_fit_are_refused_and_leave_nothing_behind(llm):
    engine: LLMEngine = llm.engine
    with pytest.raises(ValueError, match="maximum context length is 256 tokens"):
        engine.add_request("too-long", list(range(200)), SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="'prompt'"):
        engine.add_request("bad-id", [10**7], SamplingParams())
    with pytest.raises(ValueError, match="'prompt'"):
        engine.add_request("empty", [], SamplingParams())
    assert not engine.has_unfinished_requests() and _all_blocks_free(llm)


def test_request_larger_than_the_whole_cache_is_refused(model_dir):
    small = LLM(model=str(model_dir), device="cpu", num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="'max_tokens'.*KV blocks"):
        small.generate([list(range(40))], SamplingParams(max_tokens=40))


def test_abort_frees_every_block_running_or_waiting(llm):
    engine: LLMEngine = llm.engine
    for i in range(4):
        engine.add_request(f"abort-{i}", list(range(10 + i, 60 + i)), SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert llm.stats()["kv_blocks_used"] > 0
    final = engine.abort_request("abort-1")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    for i in (0, 2, 3):
        engine.abort_request(f"abort-{i}")
    assert not engine.has_unfinished_requests()
    assert _all_blocks_free(llm)


def test_abort_of_n_samples_before_their_prompt_is_computed(llm):
    engine: LLMEngine = llm.engine
    engine.add_request("n-abort", list(range(30, 90)), SamplingParams(n=3, max_tokens=5))
    assert llm.stats()["num_waiting"] == 3  # sample 0 queued, samples 1-2 wait for its prompt blocks
    final = engine.abort_request("n-abort")
    assert sorted(c.finish_reason for c in final.outputs) == ["abort"] * 3
    assert not engine.has_unfinished_requests() and _all_blocks_free(llm)
    assert llm.stats()["num_waiting"] == 0


def test_a_budget_smaller_than_the_batch_still_advances_every_request(model_dir):
    # 6 tokens per step for 10 requests: a request is admitted only with budget left after every running
    # request got its tokens, so no running request is ever skipped.
    llm = LLM(model=str(model_dir), device="cpu", max_num_batched_tokens=6, num_kv_blocks=64)
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule
    skipped = []

    def checked_schedule():
        batch = schedule()
        skipped.append(len([r for r in scheduler.running if r not in batch.requests]))
        return batch

    scheduler.schedule = checked_schedule
    outs = llm.generate([[i + 10] * 3 for i in range(10)], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [8] * 10
    assert max(skipped) == 0


def test_a_prefix_hit_then_an_end_on_a_block_boundary_frees_everything(llm):
    # 40-token prompt: its 2 full blocks come from the cache the second time; 8 more tokens end the
    # output exactly on a block boundary, after the sequence's blocks are freed.
    prompt = [300 + i for i in range(40)]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    hits_before = llm.stats()["prefix_cache_hit_tokens"]
    (out,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 8
    assert llm.stats()["prefix_cache_hit_tokens"] - hits_before == 32
    assert _all_blocks_free(llm)
