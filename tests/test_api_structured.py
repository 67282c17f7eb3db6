"""JSON mode, JSON schema and tool calling through the official OpenAI SDK against a real server.

The model has random weights, so only the constraint can make its output valid. The oracles are
independent of the server: jsonschema and json.loads for answers and call arguments, the SDK's own
parsing (pydantic models, its stream accumulator) and the chat template itself for the next turn.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from types import SimpleNamespace
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, Field
from shared_specs import SCHEMAS, TOOLS
from transformers import AutoTokenizer

from api.chat import chat_events, collect_chat
from api.protocol import ChatCompletionRequest
from api.state import ServerState
from api.tool_calls import ToolCallPlan, plan_tool_calls
from api.tool_parsers import HermesToolParser, Llama3JsonToolParser
from engine.outputs import CompletionOutput, RequestOutput

needs_xgrammar = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")

MODEL = "tiny-structured"
USER = [{"role": "user", "content": "What's the weather in Paris?"}]
NO_EOS = {"ignore_eos": True}  # a vLLM extension: the tiny random model may emit EOS at any step


TOOL_SCHEMAS = {
    t["function"]["name"]: t["function"].get("parameters", {"type": "object", "additionalProperties": False})
    for t in TOOLS
}


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    with serve_tiny_model(MODEL, arch="qwen3", num_kv_blocks=512, max_model_len=1024) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _json_schema(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _assert_compact(text: str) -> None:
    """No free whitespace: outside strings, only the single space after ':' and ','."""
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    for match in re.finditer(r"\s", skeleton):
        assert match.group() == " " and skeleton[match.start() - 1] in ":,", text


def _assert_valid_calls(tool_calls, allowed: set[str]) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


# ---- response_format ------------------------------------------------------------------------------


@needs_xgrammar
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate_against_their_schema_and_stop(client, name):
    schema = SCHEMAS[name]
    response = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        n=4,
        temperature=1.0,
        seed=7,
        max_tokens=120,
        response_format=_json_schema(name, schema),
    )
    assert len(response.choices) == 4
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
        _assert_compact(choice.message.content)
        assert choice.message.tool_calls is None


@needs_xgrammar
def test_a_streamed_json_answer_concatenates_to_the_non_streamed_one(client):
    kwargs = dict(
        model=MODEL,
        messages=USER,
        temperature=1.0,
        seed=11,
        max_tokens=120,
        response_format=_json_schema("nested", SCHEMAS["nested"]),
    )
    plain = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads(plain.message.content), SCHEMAS["nested"])


class Forecast(BaseModel):
    city: str = Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)
    highs: list[Annotated[float, Field(ge=-50, le=50)]] = Field(max_length=3)
    note: str | None = Field(max_length=6)


@needs_xgrammar
def test_the_sdk_parses_json_schema_answers_into_its_pydantic_model(client):
    # The SDK turns the model into a strict JSON schema and validates the answer with pydantic.
    completion = client.chat.completions.parse(
        model=MODEL, messages=USER, response_format=Forecast, n=3, temperature=1.0, seed=3, max_tokens=200
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Forecast)


@needs_xgrammar
def test_json_mode_answers_are_json_objects(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        n=8,
        temperature=1.0,
        seed=0,
        max_tokens=120,
        response_format={"type": "json_object"},
    )
    finished = [c.message.content for c in response.choices if c.finish_reason == "stop"]
    assert finished, "no JSON object completed"
    for content in finished:
        assert isinstance(json.loads(content), dict)
        _assert_compact(content)
    for choice in response.choices:  # cut short or not, every answer is on its way to an object
        assert choice.message.content.startswith("{")


@needs_xgrammar
def test_text_completions_take_response_format_as_an_extension(client):
    response = client.completions.create(
        model=MODEL,
        prompt="Give me JSON:",
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=120,
        extra_body={"response_format": _json_schema("enum", SCHEMAS["enum"])},
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMAS["enum"])


def test_response_format_text_constrains_nothing(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=8, temperature=0.0, extra_body=NO_EOS)
    free = client.chat.completions.create(**kwargs)
    text = client.chat.completions.create(response_format={"type": "text"}, **kwargs)
    assert text.choices[0].message.content == free.choices[0].message.content


@needs_xgrammar
@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "foo"}, 'Unsupported type "foo"'),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum greater than maximum"),
        ({"type": "object", "properties": 5}, "properties must be an object"),
        ({"type": "string", "pattern": "(ab"}, "parenthesis"),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "chat-stream", "completions"])
def test_an_invalid_json_schema_is_a_400_that_says_why(client, schema, why, endpoint):
    response_format = _json_schema("bad", schema)
    with pytest.raises(openai.BadRequestError) as error:
        if endpoint == "completions":
            client.completions.create(model=MODEL, prompt="x", extra_body={"response_format": response_format})
        else:
            stream = endpoint == "chat-stream"  # refused before the stream starts, not inside it
            client.chat.completions.create(model=MODEL, messages=USER, response_format=response_format, stream=stream)
    assert error.value.status_code == 400
    body = error.value.body
    assert body["param"] == "response_format" and body["type"] == "invalid_request_error"
    assert body["message"].startswith("Invalid value for 'response_format': invalid JSON schema")
    assert why in body["message"] and ".cc:" not in body["message"]


# ---- forced tool calls ----------------------------------------------------------------------------


@needs_xgrammar
@pytest.mark.parametrize(
    ("tool_choice", "allowed"),
    [
        ("required", set(TOOL_SCHEMAS)),
        ({"type": "function", "function": {"name": "search"}}, {"search"}),
        ({"type": "function", "function": {"name": "ping"}}, {"ping"}),
    ],
)
def test_a_forced_tool_call_names_an_allowed_tool_with_valid_arguments(client, tool_choice, allowed):
    response = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        n=4,
        temperature=1.0,
        seed=2,
        max_tokens=200,
    )
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert len(choice.message.tool_calls) == 1  # parallel_tool_calls is false
        _assert_valid_calls(choice.message.tool_calls, allowed)


@needs_xgrammar
def test_parallel_tool_calls_allow_several_calls(client):
    response = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", n=4, temperature=1.0, seed=0, max_tokens=300
    )
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        _assert_valid_calls(choice.message.tool_calls, set(TOOL_SCHEMAS))
        assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)
    assert max(len(c.message.tool_calls) for c in response.choices) > 1


@needs_xgrammar
@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_tool_calls_add_up_to_the_non_streamed_ones(client, parallel):
    kwargs = dict(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        n=2,
        temperature=1.0,
        seed=4,
        max_tokens=300,
    )
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for index, expected in enumerate(plain.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == ["tool_calls"] == [expected.finish_reason]
        assert not any(c.delta.content for c in mine)
        calls: dict[int, list[str]] = {}
        for delta_call in (call for c in mine for call in c.delta.tool_calls or []):
            function = delta_call.function
            if delta_call.index not in calls:
                # The first delta of a call: index, id, type and name, with no arguments yet.
                assert delta_call.id.startswith("call_") and delta_call.type == "function"
                assert function.name and function.arguments == ""
                assert delta_call.index == len(calls)
                calls[delta_call.index] = [function.name, ""]
            else:
                assert delta_call.id is None and function.name is None and function.arguments
                calls[delta_call.index][1] += function.arguments
        assert [tuple(calls[i]) for i in sorted(calls)] == [
            (call.function.name, call.function.arguments) for call in expected.message.tool_calls
        ]
    # The SDK's own stream accumulator assembles the same calls.
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    for choice, expected in zip(final.choices, plain.choices):
        _assert_valid_calls(choice.message.tool_calls, set(TOOL_SCHEMAS))
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in expected.message.tool_calls
        ]


class GetWeather(BaseModel):
    city: str = Field(min_length=1, max_length=8)
    unit: Literal["celsius", "fahrenheit"]


@needs_xgrammar
def test_the_sdk_parses_forced_calls_of_strict_pydantic_tools(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=USER,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        parallel_tool_calls=False,
        seed=1,
        max_tokens=120,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


@needs_xgrammar
def test_tool_calls_and_their_results_render_into_the_next_turn(client, model_dir_factory):
    first = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},  # parallel: maybe several
        seed=3,
        max_tokens=200,
    )
    assistant = first.choices[0].message
    _assert_valid_calls(assistant.tool_calls, {"get_weather"})
    results = [f'{{"temperature": {20 + i}}}' for i in range(len(assistant.tool_calls))]
    # As OpenAI's guide does it: the SDK's message object goes back into the history as it is, then
    # one tool message per call.
    tool_messages = [
        {"role": "tool", "tool_call_id": call.id, "content": result}
        for call, result in zip(assistant.tool_calls, results)
    ]
    history = [*USER, assistant, *tool_messages]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4, extra_body=NO_EOS)
    assert second.choices[0].finish_reason == "length"

    # The oracle: the template itself, given the calls in Hugging Face's form (arguments as dicts).
    tokenizer = AutoTokenizer.from_pretrained(model_dir_factory("qwen3"))
    hf_calls = [
        {"type": "function", "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}
        for call in assistant.tool_calls
    ]
    hf_history = [
        *USER,
        {"role": "assistant", "tool_calls": hf_calls},
        *({"role": "tool", "content": result} for result in results),
    ]
    rendered = tokenizer.apply_chat_template(hf_history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert rendered.count('<tool_call>\n{"name": "get_weather", "arguments": {') == len(results)
    assert all(result in rendered for result in results)
    assert second.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)


# ---- auto and none --------------------------------------------------------------------------------


def test_tool_choice_none_answers_in_content(client):
    response = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=8, extra_body=NO_EOS
    )
    choice = response.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason == "length"


def test_auto_on_a_model_that_writes_no_call_answers_in_content(client, server):
    assert server.app.state.sluice.tool_call_parser.name == "hermes"  # detected from the chat template
    kwargs = dict(model=MODEL, messages=USER, tools=TOOLS, temperature=1.0, seed=9, max_tokens=24, extra_body=NO_EOS)
    plain = client.chat.completions.create(**kwargs).choices[0]  # tool_choice defaults to "auto"
    assert plain.message.tool_calls is None and plain.message.content
    assert plain.finish_reason == "length"
    chunks = list(client.chat.completions.create(stream=True, tool_choice="auto", **kwargs))
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


@needs_xgrammar
def test_auto_with_a_json_response_format_answers_in_json_content(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        seed=1,
        max_tokens=120,
        response_format=_json_schema("e", SCHEMAS["enum"]),
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS["enum"])


# ---- auto mode on fixed model outputs (the server's own response building) ------------------------

CALLS_OUTPUT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "search", "arguments": {"query": "rain", "limit": 2}}\n</tool_call>'
)
EXPECTED_CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("search", {"query": "rain", "limit": 2})]


class _FakeStream:
    """An EngineStream whose choices are fixed texts, each cut into random pieces, the choices interleaved."""

    def __init__(self, texts: list[str], finish_reason: str = "stop", seed: int = 0) -> None:
        self.prompt_token_ids = [1, 2, 3]
        self.num_cached_tokens = 0
        rng = random.Random(seed)
        queues = []
        for index, text in enumerate(texts):
            cuts = sorted(rng.sample(range(1, len(text)), min(12, len(text) - 1)))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            last = len(pieces) - 1
            queues.append(
                [
                    CompletionOutput(index, p, [0], finish_reason=finish_reason if k == last else None)
                    for k, p in enumerate(pieces)
                ]
            )
        self._outputs = []
        while any(queues):
            self._outputs.append(rng.choice([q for q in queues if q]).pop(0))

    async def __aiter__(self):
        for output in self._outputs:
            yield RequestOutput("r", None, self.prompt_token_ids, [output], finished=False)


_STATE = SimpleNamespace(model_name=MODEL, token_text=None, system_fingerprint="fp_test")


async def _auto_plan(**request) -> ToolCallPlan:
    body = ChatCompletionRequest(model=MODEL, messages=USER, tools=TOOLS, **request)
    return await plan_tool_calls(body, HermesToolParser())


async def _complete(plan: ToolCallPlan, texts: list[str], finish_reason: str = "stop") -> ChatCompletion:
    response = await collect_chat(_STATE, _FakeStream(texts, finish_reason), "chatcmpl-1", 0, len(texts), plan)
    return ChatCompletion.model_validate(response.model_dump())  # as the SDK reads it


async def _stream(plan: ToolCallPlan, texts: list[str], finish_reason: str = "stop") -> list[ChatCompletionChunk]:
    stream = _FakeStream(texts, finish_reason, seed=1)
    events = [e async for e in chat_events(_STATE, stream, "chatcmpl-1", 0, len(texts), False, plan)]
    assert events[-1] == b"data: [DONE]\n\n"
    return [ChatCompletionChunk.model_validate_json(e.removeprefix(b"data: ")) for e in events[:-1]]


def _calls_of(tool_calls) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in tool_calls or []]


def _assembled(chunks: list[ChatCompletionChunk], index: int) -> tuple[str, list[tuple[str, dict]], list[str]]:
    """Content, calls and finish reasons of one choice of a stream, put together as a client does."""
    content, names, arguments, finishes = "", {}, {}, []
    for chunk in chunks:
        (choice,) = chunk.choices
        if choice.index != index:
            continue
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.id is not None:
                names[call.index], arguments[call.index] = call.function.name, ""
            arguments[call.index] += call.function.arguments or ""
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    return content, [(names[i], json.loads(arguments[i])) for i in sorted(names)], finishes


async def test_auto_mode_turns_calls_in_the_output_into_tool_calls():
    plan = await _auto_plan()
    other = "No call here, just text."
    response = await _complete(plan, [CALLS_OUTPUT, other])
    with_calls, without = response.choices
    assert with_calls.finish_reason == "tool_calls"
    assert with_calls.message.content == "Let me check."
    assert _calls_of(with_calls.message.tool_calls) == EXPECTED_CALLS
    assert all(call.id.startswith("call_") for call in with_calls.message.tool_calls)
    assert (without.finish_reason, without.message.content, without.message.tool_calls) == ("stop", other, None)

    chunks = await _stream(plan, [CALLS_OUTPUT, other])  # one parser per choice
    assert _assembled(chunks, 0) == ("Let me check.", EXPECTED_CALLS, ["tool_calls"])
    assert _assembled(chunks, 1) == (other, [], ["stop"])


async def test_auto_mode_keeps_malformed_calls_as_content_and_respects_parallel_false():
    malformed = 'Sure.\n<tool_call>\n{"name": "search", "arguments": {"query": }\n</tool_call>'
    response = await _complete(await _auto_plan(), [malformed])
    assert response.choices[0].message.content == malformed and response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.tool_calls is None

    single = await _auto_plan(parallel_tool_calls=False)
    response = await _complete(single, [CALLS_OUTPUT])
    assert _calls_of(response.choices[0].message.tool_calls) == EXPECTED_CALLS[:1]
    assert _assembled(await _stream(single, [CALLS_OUTPUT]), 0)[1] == EXPECTED_CALLS[:1]


@needs_xgrammar
async def test_forced_calls_take_the_model_familys_format():
    request = ChatCompletionRequest(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required")
    llama = await plan_tool_calls(request, Llama3JsonToolParser())
    grammar = llama.constraint.grammar  # EBNF: its string literals escape the quotes
    assert isinstance(llama.parser, Llama3JsonToolParser) and "parameters" in grammar and "<tool_call>" not in grammar
    hermes = await plan_tool_calls(request, HermesToolParser())
    assert isinstance(hermes.parser, HermesToolParser) and "<tool_call>" in hermes.constraint.grammar
    unknown = await plan_tool_calls(request, None)  # no family format known: hermes
    assert isinstance(unknown.parser, HermesToolParser) and "<tool_call>" in unknown.constraint.grammar


async def test_auto_mode_reads_llama3_json_calls_with_that_parser():
    body = ChatCompletionRequest(model=MODEL, messages=USER, tools=TOOLS)
    plan = await plan_tool_calls(body, Llama3JsonToolParser())
    output = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "search", "parameters": {"query": "rain", "limit": 2}}'
    )
    response = await _complete(plan, [output])
    assert response.choices[0].finish_reason == "tool_calls" and response.choices[0].message.content is None
    assert _calls_of(response.choices[0].message.tool_calls) == EXPECTED_CALLS
    assert _assembled(await _stream(plan, [output]), 0) == ("", EXPECTED_CALLS, ["tool_calls"])


async def test_a_cut_off_output_with_calls_keeps_finish_reason_length():
    response = await _complete(await _auto_plan(), [CALLS_OUTPUT], finish_reason="length")
    assert response.choices[0].finish_reason == "length"
    assert _calls_of(response.choices[0].message.tool_calls) == EXPECTED_CALLS


async def test_tool_choice_none_and_json_content_run_no_parser():
    none = await _auto_plan(tool_choice="none")
    assert none.parser is None and none.constraint is None
    response = await _complete(none, [CALLS_OUTPUT])
    assert response.choices[0].message.content == CALLS_OUTPUT and response.choices[0].finish_reason == "stop"
    body = ChatCompletionRequest(model=MODEL, messages=USER, tools=TOOLS)
    assert (await plan_tool_calls(body, HermesToolParser(), content_constrained=True)).parser is None


def test_the_tool_call_parser_comes_from_the_flag_or_the_chat_template(model_dir_factory):
    tokenizer = AutoTokenizer.from_pretrained(model_dir_factory("qwen3"))
    engine = SimpleNamespace(
        tokenizer=tokenizer, model_name=MODEL, max_model_len=64, vocab_size=len(tokenizer), stats=lambda: {}
    )
    assert ServerState(engine).tool_call_parser.name == "hermes"
    assert ServerState(engine, tool_call_parser="llama3_json").tool_call_parser.name == "llama3_json"
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerState(engine, tool_call_parser="nope")
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"  # teaches no call format
    assert ServerState(engine).tool_call_parser is None
