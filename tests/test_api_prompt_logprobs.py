"""Prompt logprobs (lm-eval-harness scoring): checked against log_softmax of transformers' own forward
pass in float32 over the same prompt."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from api.app import create_app
from api.server import BackgroundServer
from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling.sampling_params import SamplingParams

MODEL = "tiny-scorer"
PROMPT = "The engine streams text back to the client as soon as each token is sampled."


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("qwen3")


@pytest.fixture(scope="module")
def reference(model_dir):
    """log_softmax of transformers' forward: reference(ids)[i] is the distribution after ids[: i + 1]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def _check_entries(entries, ids, reference, k):
    expected = reference(ids)
    assert entries[0] is None and len(entries) == len(ids)
    for position, entry in enumerate(entries[1:], start=1):
        row = expected[position - 1]
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(row[ids[position]].item(), abs=1e-4)
        assert entry.rank == int((row > row[ids[position]]).sum()) + 1
        top = row.topk(k)
        assert [t for t, _ in entry.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_the_engine_computes_prompt_logprobs_across_chunks_and_cache_hits(model_dir, reference, monkeypatch):
    # A 7-token step budget cuts the prompt into chunks; the second request could read it from the cache;
    # the rows of a chunk go through the LM head 4 at a time.
    monkeypatch.setattr("engine.sampling.prompt_logprobs.ROWS_PER_SLICE", 4)
    llm = LLM(model=str(model_dir), device="cpu", num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=7)
    ids = llm.get_tokenizer().encode(PROMPT)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    for _ in range(2):
        (output,) = llm.generate([ids], params)
        _check_entries(output.prompt_logprobs, ids, reference, 3)
        assert output.num_cached_tokens == 0  # scored prompts are always computed
    assert llm.generate([ids], SamplingParams(max_tokens=1))[0].prompt_logprobs is None


@pytest.fixture(scope="module")
def client(model_dir):
    config = EngineConfig(
        model=str(model_dir), served_model_name=MODEL, device="cpu", num_kv_blocks=128, max_model_len=256
    )
    with BackgroundServer(create_app(AsyncLLM(config))) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_echo_logprobs_with_max_tokens_0_scores_the_prompt_as_lm_eval_harness_asks(client, model_dir, reference):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(PROMPT)
    response = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = response.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(ids)
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference(ids)
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(
            expected[position - 1, ids[position]].item(), abs=1e-4
        )
        assert logprobs.tokens[position] in logprobs.top_logprobs[position]
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]
    # lm-eval-harness's loglikelihood: the sum over a continuation's tokens.
    total = sum(expected[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert math.isclose(sum(logprobs.token_logprobs[1:]), total, abs_tol=1e-3)


def test_streamed_scoring_gives_the_same_answer(client):
    kwargs = {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0}
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text == PROMPT
    streamed = [c.logprobs for c in chunks if c.logprobs]
    assert [t for part in streamed for t in part.tokens] == whole.logprobs.tokens
    assert [lp for part in streamed for lp in part.token_logprobs] == whole.logprobs.token_logprobs
    assert chunks[-1].finish_reason == "length"


def test_echo_logprobs_continue_with_the_generated_tokens(client):
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    logprobs = response.choices[0].logprobs
    num_prompt = response.usage.prompt_tokens
    assert len(logprobs.tokens) == num_prompt + 3
    assert all(lp is not None for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens[:num_prompt]) == PROMPT  # (a generated token may hold half a character)
    assert response.choices[0].text.startswith(PROMPT)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_vllms_prompt_logprobs_field(client, model_dir, reference):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 1})
    scored = response.choices[0].model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    expected = reference(ids)
    for position in range(1, len(ids)):
        entry = scored[position][str(ids[position])]
        assert entry["logprob"] == pytest.approx(expected[position - 1, ids[position]].item(), abs=1e-4)
        assert entry["rank"] >= 1 and isinstance(entry["decoded_token"], str)
        assert any(e["rank"] == 1 for e in scored[position].values())
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_max_tokens_0_needs_echo(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert error.value.body["param"] == "max_tokens"
