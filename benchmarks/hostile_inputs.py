"""A corpus of hostile and malformed requests: each one must get a 4xx in the OpenAI error shape
(`{"error": {"message", "type", "param", "code"}}`), and leave the server serving normally.

    from benchmarks.hostile_inputs import CASES
    for case in CASES:
        response = httpx.request(case.method, url + case.path, content=case.body, headers=case.headers)

Bodies are bytes, exactly as sent (some are not valid JSON, or not valid UTF-8). They name the
built-in demo model (`MODEL`); `with_model` renames it for a server serving another one (otherwise
the cases that pass validation end in a 404 for the model, still a 4xx but not the check intended).
The cases come from issue 11 (each once answered 500, stalled the server, or was accepted) plus
wrong types, non-finite and huge numbers, deep nesting, invalid UTF-8 and oversized lists.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# The built-in demo model's served name (engine.models.demo_model.DEMO_MODEL_ID, which the tests check),
# spelled out so that a client importing the corpus does not import torch.
MODEL = "demo-random"
JSON_HEADERS = {"Content-Type": "application/json"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class HostileCase:
    name: str
    method: str
    path: str
    body: bytes
    headers: dict[str, str]


def with_model(case: HostileCase, model: str) -> HostileCase:
    """The case with the demo model's name replaced by `model` (in the body and the path)."""
    quoted = json.dumps(MODEL).encode()
    return dataclasses.replace(
        case,
        path=case.path.replace(MODEL, model),
        body=case.body.replace(quoted, json.dumps(model).encode()),
    )


def _nested_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _json(name: str, path: str, body: dict[str, Any]) -> HostileCase:
    return HostileCase(name, "POST", path, json.dumps(body).encode(), dict(JSON_HEADERS))


def _raw(name: str, path: str, body: bytes) -> HostileCase:
    return HostileCase(name, "POST", path, body, dict(JSON_HEADERS))


def _chat(name: str, **fields: Any) -> HostileCase:
    return _json(name, CHAT, {"model": MODEL, "messages": USER, "max_tokens": 4, **fields})


def _completion(name: str, **fields: Any) -> HostileCase:
    return _json(name, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **fields})


def _tool_call_turns(arguments: str) -> list[dict[str, Any]]:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    answer = {"role": "tool", "tool_call_id": "call_1", "content": "x"}
    return [*USER, {"role": "assistant", "tool_calls": [call]}, answer]


_MODEL_JSON = json.dumps(MODEL)

CASES: list[HostileCase] = [
    # ---- invalid Unicode ---------------------------------------------------------------------
    _raw("prompt with a lone surrogate escape", COMPLETIONS,
         b'{"model": ' + _MODEL_JSON.encode() + b', "prompt": "\\ud800", "max_tokens": 2}'),
    _raw("prompt with raw surrogate bytes ED A0 80", COMPLETIONS,
         b'{"model": ' + _MODEL_JSON.encode() + b', "prompt": "\xed\xa0\x80", "max_tokens": 2}'),
    _raw("chat content with a lone low surrogate", CHAT,
         b'{"model": ' + _MODEL_JSON.encode() + b', "messages": [{"role": "user", "content": "a\\udfffb"}]}'),
    _raw("unknown model name with a lone surrogate", CHAT,
         b'{"model": "gpt-\\ud800", "messages": [{"role": "user", "content": "Hi"}]}'),
    _raw("surrogate in a dict key", CHAT,
         b'{"model": ' + _MODEL_JSON.encode() + b', "messages": [{"role": "user", "content": "Hi"}], '
         b'"chat_template_kwargs": {"\\ud800": 1}}'),
    _raw("invalid UTF-8 byte in a string", CHAT,
         b'{"model": ' + _MODEL_JSON.encode() + b', "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    _raw("body that is not UTF-8 at all", CHAT, b"\xff\xfe\xfd\x00garbage"),
    HostileCase("model id with percent-encoded surrogate bytes", "GET", "/v1/models/%ED%A0%80", b"", {}),
    # ---- deep nesting ------------------------------------------------------------------------
    _chat("json_schema nested 300 levels",
          response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": _nested_schema(300)}}),
    _chat("chat_template_kwargs nested 900 levels", chat_template_kwargs={"x": _nested_list(900)}),
    _chat("tool parameters nested 900 levels",
          tools=[{"type": "function", "function": {"name": "f", "parameters": {"x": _nested_list(900)}}}]),
    _chat("tool call arguments of 1000 open brackets", messages=_tool_call_turns("[" * 1000)),
    _chat("tool call arguments nested 500 levels", messages=_tool_call_turns(json.dumps(_nested_list(500)))),
    _raw("body nested 100,000 levels", CHAT, b"[" * 100_000 + b"]" * 100_000),
    _raw("object nested 5,000 levels", CHAT, b'{"a":' * 5000 + b"1" + b"}" * 5000),
    # ---- non-finite and huge numbers ---------------------------------------------------------
    _raw("temperature NaN", CHAT,
         b'{"model": ' + _MODEL_JSON.encode() + b', "messages": [{"role": "user", "content": "Hi"}], '
         b'"temperature": NaN}'),
    _raw("repetition_penalty Infinity", CHAT,
         b'{"model": ' + _MODEL_JSON.encode() + b', "messages": [{"role": "user", "content": "Hi"}], '
         b'"repetition_penalty": Infinity}'),
    _raw("top_p -Infinity", COMPLETIONS,
         b'{"model": ' + _MODEL_JSON.encode() + b', "prompt": "Hi", "top_p": -Infinity}'),
    _raw("logit_bias value NaN", CHAT,
         b'{"model": ' + _MODEL_JSON.encode() + b', "messages": [{"role": "user", "content": "Hi"}], '
         b'"logit_bias": {"5": NaN}}'),
    _chat("repetition_penalty 1e308", repetition_penalty=1e308),
    _chat("temperature 1e308", temperature=1e308),
    _chat("top_k 1e30", top_k=1e30),
    _chat("max_tokens 10**30", max_tokens=10**30),
    _chat("seed 2**64", seed=2**64),
    _chat("presence_penalty 3", presence_penalty=3),
    _chat("temperature -1", temperature=-1),
    _chat("max_tokens 0", max_tokens=0),
    _completion("prompt token id 10**20", prompt=[10**20]),
    _completion("prompt token id outside the vocabulary", prompt=[10**9]),
    _completion("negative prompt token id", prompt=[-1]),
    _chat("logit_bias token id outside the vocabulary", logit_bias={"99999999999999999999999": 1}),
    # ---- wrong types -------------------------------------------------------------------------
    _chat("n true", n=True),
    _chat("n 2.0", n=2.0),
    _chat("n as a string", n="2"),
    _chat("temperature true", temperature=True),
    _chat("messages as a string", messages="hello"),
    _chat("a message without a role", messages=[{"content": "hi"}]),
    _chat("a message with role robot", messages=[{"role": "robot", "content": "hi"}]),
    _chat("model as a number", model=123),
    _chat("stop as a number", stop=5),
    _chat("max_tokens as a string", max_tokens="16"),
    _completion("prompt as an object", prompt={"text": "hi"}),
    _completion("prompt as a number", prompt=5),
    _raw("body is a JSON array", CHAT, b"[1, 2]"),
    _raw("body is a JSON string", CHAT, b'"hello"'),
    _raw("body is null", CHAT, b"null"),
    _raw("empty body", CHAT, b""),
    _raw("truncated JSON", CHAT, b'{"model": ' + _MODEL_JSON.encode() + b', "messages": ['),
    # ---- sizes -------------------------------------------------------------------------------
    _chat("10k stop strings", stop=[f"stop-{i}" for i in range(10_000)]),
    _chat("huge n", n=10**6),
    _chat("empty messages", messages=[]),
    _completion("2,000 prompts in one request", prompt=["Hi"] * 2000),
    _completion("prompt far longer than any context", prompt="hello " * 50_000),
    _chat("10k one-word messages", messages=[{"role": "user", "content": "word"}] * 10_000),
    _chat("top_logprobs 21", logprobs=True, top_logprobs=21),
    _chat("a 1 MB model name", model="m" * 1_000_000),
    # ---- unsupported or inconsistent ---------------------------------------------------------
    _chat("an image part", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]),
    _chat("tool_choice naming a missing tool", tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "nope"}}),
    _chat("json_schema without a schema", response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
    _chat("stream_options without stream", stream_options={"include_usage": True}),
    _chat("reserved chat_template_kwargs", chat_template_kwargs={"tokenize": False}),
    _chat("min_tokens above max_tokens", min_tokens=9, max_tokens=3),
    _completion("suffix", suffix="fill in the middle"),
    _completion("max_tokens 0 without echo", max_tokens=0),
    _completion("prompt_logprobs above the maximum", prompt_logprobs=10**6),
    # ---- paths and methods -------------------------------------------------------------------
    HostileCase("unknown path", "POST", "/v1/nothing-here", b"{}", dict(JSON_HEADERS)),
    HostileCase("GET on a POST route", "GET", CHAT, b"", {}),
    HostileCase("unknown model id", "GET", "/v1/models/not-this-one", b"", {}),
]  # fmt: skip
