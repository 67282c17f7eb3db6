"""Reasoning models: the thinking block as reasoning_content, the answer (and its constraint) after it.

Server tests run a tiny Qwen3-style model (`tests/thinking_model.py`) whose outputs are forced by
logit_bias: `<think>`, two words, `</think>`, then the answer; the largest repetition_penalty makes each
biased token fall away once used, so the bias order is the token order. The oracle for the split is
the same request through /v1/completions, which returns the raw text unparsed.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from api.app import create_app
from api.options import ServerOptions
from api.reasoning import (
    THINK_END,
    THINK_START,
    Phase,
    get_reasoning_parser,
    parser_name_for_template,
    split_reasoning,
)
from api.server import BackgroundServer
from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.sampling.sampling_params import MAX_REPETITION_PENALTY
from tests.thinking_model import QWEN3_STYLE_TEMPLATE, build_thinking_model_dir

MODEL = "tiny-thinker"
QUESTION = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


# ---- the text split, without a model ---------------------------------------------------------


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory):
    return build_thinking_model_dir(tmp_path_factory.mktemp("thinking-model"))


@pytest.fixture(scope="module")
def tokenizer(thinking_dir):
    return AutoTokenizer.from_pretrained(thinking_dir)


@pytest.mark.parametrize(
    ("name", "phase", "text", "expected"),
    [
        ("qwen3", Phase.OPENING, "<think>\nhmm</think>\n\nYes.", ("\nhmm", "\n\nYes.")),
        ("qwen3", Phase.OPENING, "Yes, no <think> here.", (None, "Yes, no <think> here.")),
        ("qwen3", Phase.OPENING, "<think>cut off by max_tokens", ("cut off by max_tokens", "")),
        ("qwen3", Phase.ANSWER, "<think>x</think>y", (None, "<think>x</think>y")),
        ("qwen3", Phase.THINKING, "still thinking</think>done", ("still thinking", "done")),
        ("deepseek_r1", Phase.THINKING, "no opening marker</think>answer", ("no opening marker", "answer")),
        ("deepseek_r1", Phase.THINKING, "<think>a repeated opening</think>answer", ("a repeated opening", "answer")),
        ("deepseek_r1", Phase.THINKING, "a</think>b</think>c", ("a", "b</think>c")),
    ],
)
def test_a_whole_output_splits_into_reasoning_and_content(tokenizer, name, phase, text, expected):
    parser = get_reasoning_parser(name, tokenizer)
    assert split_reasoning(parser, phase, text) == expected


@pytest.mark.parametrize("phase", [Phase.OPENING, Phase.THINKING])
def test_deltas_cut_anywhere_add_up_to_the_whole_split(tokenizer, phase):
    parser = get_reasoning_parser("qwen3", tokenizer)
    text = "<think>step one < two </thin k></think>The answer </think> is <think> 42."
    whole = split_reasoning(parser, phase, text)
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1, 3):
            splitter = parser.splitter(phase)
            parts = [splitter.feed(piece) for piece in (text[:first], text[first:second])]
            parts.append(splitter.feed(text[second:], final=True))
            reasoning = "".join(r for r, _ in parts)
            content = "".join(c for _, c in parts)
            assert (reasoning if splitter.saw_reasoning else None, content) == whole, (first, second)
            # A marker never leaks out in pieces: what is held back is only ever a marker's prefix.
            assert all(THINK_END not in r for r, _ in parts)


def test_the_prompts_tail_decides_where_the_output_starts(tokenizer):
    parser = get_reasoning_parser("qwen3", tokenizer)

    def prompt(**kwargs):
        return tokenizer.apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
        )

    assert parser.initial_phase(prompt()) == Phase.OPENING
    assert parser.initial_phase(prompt(enable_thinking=False)) == Phase.ANSWER
    opened = prompt() + tokenizer.encode(THINK_START)
    assert parser.initial_phase(opened) == Phase.THINKING
    # A closed block of an earlier turn says nothing about this one: the generation prompt comes after it.
    history = QUESTION + [{"role": "assistant", "content": "<think>x</think>no"}, *QUESTION]
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.convert_tokens_to_ids(THINK_END) in ids
    assert parser.initial_phase(ids) == Phase.OPENING
    r1 = get_reasoning_parser("deepseek_r1", tokenizer)
    assert r1.initial_phase(prompt()) == Phase.THINKING


def test_the_parser_is_detected_from_the_template_only_where_unambiguous():
    assert parser_name_for_template(QWEN3_STYLE_TEMPLATE) == "qwen3"
    assert parser_name_for_template("{{ '<｜Assistant｜><think>\\n' }}") == "deepseek_r1"
    assert parser_name_for_template("{{ '<think>' }}") is None  # thinks, but in no format we know
    assert parser_name_for_template("{{ messages }}") is None


def test_a_parser_needs_its_markers_as_single_tokens():
    from engine.models.demo_model import build_tokenizer

    with pytest.raises(ValueError, match="reasoning_parser.*<think>"):
        get_reasoning_parser("qwen3", build_tokenizer())


def test_the_grammar_waits_for_the_end_of_the_thinking(tokenizer):
    import torch

    from engine.sampling.structured_outputs import GrammarManager, StructuredOutputsParams, ThinkingMarkers

    vocab = len(tokenizer)
    start, end = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
    manager = GrammarManager(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id], max_rows=2)
    compiled = manager.compile(StructuredOutputsParams(choice=["yes"]))
    yes = tokenizer.encode("yes", add_special_tokens=False)

    def allowed(grammar) -> set[int]:
        logits = torch.zeros(1, vocab)
        manager.apply_bitmask(logits, [0], [grammar])
        return set(torch.nonzero(logits[0] == 0).flatten().tolist())

    unconstrained = manager.new_sequence_grammar(compiled)
    opening = manager.new_sequence_grammar(compiled, ThinkingMarkers(start, end, thinking=False))
    assert allowed(opening) == allowed(unconstrained) | {start}  # the answer, or a thinking block
    assert opening.accept(start) and not opening.is_terminated()
    assert len(allowed(opening)) == vocab  # thinking: free text
    for token in tokenizer.encode("any words at all", add_special_tokens=False):
        assert opening.accept(token)
    assert opening.accept(end)
    assert allowed(opening) == allowed(unconstrained) == {yes[0]}
    for token in yes:
        assert opening.accept(token)
    assert opening.accept(tokenizer.eos_token_id) and opening.is_terminated()
    # Without a thinking block: the first token is the answer's, and the grammar holds from there.
    direct = manager.new_sequence_grammar(compiled, ThinkingMarkers(start, end, thinking=False))
    assert direct.accept(yes[0])
    assert start not in allowed(direct)
    # A prompt that opened the block: free text from the first token.
    opened = manager.new_sequence_grammar(compiled, ThinkingMarkers(start, end, thinking=True))
    assert len(allowed(opened)) == vocab and not opened.is_terminated()


# ---- through the server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(thinking_dir):
    # No reasoning parser named: the template's thinking switch makes it qwen3.
    config = EngineConfig(
        model=str(thinking_dir), served_model_name=MODEL, device="cpu", num_kv_blocks=256, max_model_len=512
    )
    with BackgroundServer(create_app(AsyncLLM(config))) as running:
        assert running.app.state.sluice.reasoning_parser.name == "qwen3"
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def forced(tokenizer):
    """logit_bias (and the penalty) that make the output `<think>` w1 w2 `</think>` then the answer."""
    prompt = set(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False))
    words = [t for t in dict.fromkeys(tokenizer.encode(" Attention streams tokens")) if t not in prompt][:2]
    assert len(words) == 2
    start, end = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
    bias = {str(start): 100, str(words[0]): 80, str(words[1]): 60, str(end): 40}
    return {
        "temperature": 0,
        "logit_bias": bias,
        "extra_body": {"repetition_penalty": MAX_REPETITION_PENALTY},
        "thought": tokenizer.decode(words),
    }


def _chat(client, forced, **kwargs):
    args = {k: v for k, v in forced.items() if k != "thought"}
    extra = {**args.pop("extra_body"), **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=extra, **args, **kwargs)


def test_the_thinking_is_reasoning_content_and_the_rest_is_content(server, client, forced):
    response = _chat(client, forced, max_tokens=12)
    message = response.choices[0].message
    assert message.reasoning_content == forced["thought"]
    assert message.model_extra["reasoning"] == forced["thought"]  # vLLM's newer name, same text
    # Oracle: the same tokens unparsed, from /v1/completions on the same prompt ids.
    prompt_ids = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": QUESTION}).json()["tokens"]
    raw = client.completions.create(
        model=MODEL,
        prompt=prompt_ids,
        max_tokens=12,
        temperature=0,
        logit_bias=forced["logit_bias"],
        extra_body={"repetition_penalty": MAX_REPETITION_PENALTY, "skip_special_tokens": True},
    )
    assert raw.choices[0].text == f"{THINK_START}{forced['thought']}{THINK_END}{message.content or ''}"


def test_streamed_thinking_arrives_as_reasoning_content_deltas(client, forced):
    whole = _chat(client, forced, max_tokens=12).choices[0].message
    reasoning, content, reasoning_chunks = "", "", 0
    for chunk in _chat(client, forced, max_tokens=12, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is None:
            continue
        if getattr(delta, "reasoning_content", None):
            reasoning += delta.reasoning_content
            reasoning_chunks += 1
            assert not delta.content  # a chunk carries one or the other
        content += delta.content or ""
    # At least one reasoning delta; not necessarily several: the engine front merges the deltas a slow
    # reader has not taken yet (engine/async_llm.py), and on a loaded CI box all twelve tokens once came
    # as one chunk. That tokens stream while the request runs is test_api_streaming's to show.
    assert reasoning_chunks >= 1
    assert reasoning == whole.reasoning_content
    assert content == (whole.content or "")


def test_a_json_schema_constrains_the_answer_after_the_thinking(client, forced):
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    for stream in (False, True):
        if stream:
            pieces = _chat(client, forced, max_tokens=40, response_format=response_format, stream=True)
            deltas = [c.choices[0].delta for c in pieces if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
        else:
            message = _chat(client, forced, max_tokens=40, response_format=response_format).choices[0].message
            reasoning, content = message.reasoning_content, message.content
        assert reasoning == forced["thought"]
        jsonschema.validate(json.loads(content), ANSWER_SCHEMA)


def test_enable_thinking_false_reaches_the_template_and_the_answer_is_constrained_at_once(server, client, forced):
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION, **kwargs}).json()["tokens"]
    assert int(next(k for k, v in forced["logit_bias"].items() if v == 40)) in tokens  # the closed block
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    # The grammar now holds from the first token: the biased <think> is not allowed.
    message = _chat(client, forced, max_tokens=40, extra_body=kwargs, response_format=response_format)
    message = message.choices[0].message
    assert message.reasoning_content is None
    jsonschema.validate(json.loads(message.content), ANSWER_SCHEMA)


def test_forced_tool_calls_come_after_the_thinking(client, forced):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    response = _chat(client, forced, max_tokens=100, tools=tools, tool_choice="required", parallel_tool_calls=False)
    choice = response.choices[0]
    assert choice.message.reasoning_content == forced["thought"]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")


def test_a_named_reasoning_parser_needs_its_markers(model_dir_factory):
    config = EngineConfig(model=str(model_dir_factory("qwen3")), device="cpu", num_kv_blocks=16, max_model_len=64)
    engine = AsyncLLM(config)
    try:
        with pytest.raises(ValueError, match="<think>"):
            create_app(engine, options=ServerOptions(reasoning_parser="qwen3"))
        assert create_app(engine, shutdown_engine=False).state.sluice.reasoning_parser is None
    finally:
        engine.close()
