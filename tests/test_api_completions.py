"""Legacy text completions (/v1/completions) through the official OpenAI SDK."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

MODEL = "tiny-completions"
NO_EOS = {"ignore_eos": True}  # a vLLM extension: the tiny random model may emit EOS at any step
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("qwen3")


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    with serve_tiny_model(MODEL, arch="qwen3", num_kv_blocks=256, max_model_len=256) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # No --api-key on this server: any key (the SDK insists on one) is accepted.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_text_completion_has_the_openai_shape(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, extra_body=NO_EOS)
    assert response.id.startswith("cmpl-")
    assert response.object == "text_completion"
    assert response.model == MODEL
    (choice,) = response.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


def test_max_tokens_defaults_to_16_like_openai(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=NO_EOS)
    assert response.usage.completion_tokens == 16


def test_token_id_prompts_equal_their_text(client, model_dir):
    ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)
    kwargs = dict(model=MODEL, max_tokens=8, temperature=0.0)
    by_text = client.completions.create(prompt=PROMPT, **kwargs)
    by_ids = client.completions.create(prompt=ids, **kwargs)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens


def test_several_prompts_give_n_choices_each_in_prompt_order(client, model_dir):
    ids = AutoTokenizer.from_pretrained(model_dir).encode("Hello, world!")
    kwargs = dict(model=MODEL, max_tokens=5, temperature=0.0, n=2)
    batch = client.completions.create(prompt=[PROMPT, "Hello, world!"], **kwargs)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    first = client.completions.create(prompt=PROMPT, **kwargs).choices[0].text
    second = client.completions.create(prompt=[ids], **kwargs).choices[0].text
    assert [c.text for c in batch.choices] == [first, first, second, second]  # greedy: samples agree
    single = client.completions.create(prompt=PROMPT, **kwargs).usage
    assert batch.usage.prompt_tokens == single.prompt_tokens + len(ids)


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.0)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_logprobs_is_an_int_and_gives_parallel_lists(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=2, extra_body=NO_EOS)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0.0
        assert token in top and len(top) <= 3  # the 2 alternatives, plus the sampled token if not among them


def test_the_stream_equals_the_non_streamed_completion_for_the_same_seed(client):
    kwargs = dict(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=12, temperature=1.0, seed=7, n=2)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *content, usage_chunk = chunks
    assert len({c.id for c in chunks}) == 1 and {c.object for c in chunks} == {"text_completion"}
    for choice in plain.choices:
        mine = [c.choices[0] for c in content if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert usage_chunk.choices == [] and usage_chunk.usage == plain.usage


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "the end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_what_is_not_implemented_is_a_clear_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **extra)
    assert error.value.body["param"] == param
    assert "not supported" in error.value.body["message"]


@pytest.mark.parametrize(
    ("prompt", "param"),
    [("", "prompt"), ([], "prompt"), ([[]], "prompt[0]"), ([10**9], "prompt")],
)
def test_empty_or_out_of_vocabulary_prompts_are_400(client, prompt, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert error.value.body["param"] == param
