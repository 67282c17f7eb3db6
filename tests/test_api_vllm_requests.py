"""Request bodies vLLM users send, through the OpenAI SDK (`extra_body`), and vLLM's extra routes.

Oracles: the SDK's own parsing, jsonschema and `re` for constrained outputs, the same request's other
spelling (vLLM's fields and OpenAI's response_format must give identical greedy text), the tokenizer
itself for /tokenize, /detokenize and chat templates, and greedy outputs of the prompt it should equal.
"""

from __future__ import annotations

import json
import logging
import re

import httpx
import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from api.app import create_app
from api.options import ServerOptions
from api.server import BackgroundServer
from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.sampling.sampler import Sampler, SamplingRow
from engine.sampling.sampling_params import SamplingParams

MODEL = "tiny-vllm"
ALIAS = "gpt-4o-mini"
ORIGIN = "https://dashboard.example"
USER = [{"role": "user", "content": "Why is the sky blue?"}]
GREEDY = {"temperature": 0}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "rank": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(model_dir_factory):
    config = EngineConfig(
        model=str(model_dir_factory()), served_model_name=MODEL, device="cpu", num_kv_blocks=256, max_model_len=512
    )
    engine = AsyncLLM(config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    options = ServerOptions(served_model_aliases=(ALIAS,), max_logprobs=5, allowed_origins=(ORIGIN,))
    with BackgroundServer(create_app(engine, options=options, shutdown_engine=False)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.tokenizer


def _text(client, **kwargs) -> str:
    return client.completions.create(model=MODEL, max_tokens=24, **GREEDY, **kwargs).choices[0].text


# ---- structured outputs ------------------------------------------------------------------------


def test_guided_json_gives_schema_valid_json(client):
    response = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=80, extra_body={"guided_json": SCHEMA}, **GREEDY
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize(
    "vllm_fields",
    [
        {"guided_json": SCHEMA},
        {"structured_outputs": {"json": SCHEMA}},
        {"structured_outputs": {"json": json.dumps(SCHEMA)}},
    ],
)
def test_vllms_json_fields_constrain_as_response_format_does(client, vllm_fields):
    openai_way = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    expected = _text(client, prompt="JSON:", extra_body={"response_format": openai_way, "max_tokens": 80})
    assert _text(client, prompt="JSON:", extra_body={**vllm_fields, "max_tokens": 80}) == expected
    jsonschema.validate(json.loads(expected), SCHEMA)


def test_json_object_is_response_formats_json_mode(client):
    kwargs = {"prompt": "An object:", "max_tokens": 40, **GREEDY}
    expected = client.completions.create(model=MODEL, **kwargs, extra_body={"response_format": {"type": "json_object"}})
    got = client.completions.create(model=MODEL, **kwargs, extra_body={"structured_outputs": {"json_object": True}})
    assert got.choices[0].text == expected.choices[0].text
    assert got.choices[0].text.startswith("{")


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"guided_regex": r"[a-c]{3}-[0-9]{2}"}, r"[a-c]{3}-[0-9]{2}"),
        ({"structured_outputs": {"regex": r"(yes|no), [0-9]"}}, r"(yes|no), [0-9]"),
        ({"guided_choice": ["red", "green", "blue"]}, r"red|green|blue"),
        ({"structured_outputs": {"choice": ["up", "down"]}}, r"up|down"),
        ({"guided_grammar": 'root ::= "go " [0-9] | "stop"'}, r"go [0-9]|stop"),
        ({"structured_outputs": {"grammar": 'root ::= ("ab" | "c")+ "!"'}}, r"(ab|c)+!"),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_regex_choice_and_grammar_constrain_the_output(client, fields, pattern, endpoint):
    if endpoint == "chat":
        response = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, extra_body=fields)
        text, reason = response.choices[0].message.content, response.choices[0].finish_reason
    else:
        response = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, extra_body=fields)
        text, reason = response.choices[0].text, response.choices[0].finish_reason
    if reason == "stop":
        assert re.fullmatch(pattern, text), text
    else:  # the last rule can repeat: cut by max_tokens, it is still a prefix of a sentence
        assert re.fullmatch(r"(ab|c)+", text), text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= nothing_defined"}}, "structured_outputs"),
    ],
)
def test_a_bad_or_conflicting_constraint_is_a_400_naming_it(server, body, param):
    response = httpx.post(
        f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **body}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# ---- other request fields --------------------------------------------------------------------


def test_unknown_fields_are_ignored_and_logged_once_per_name(client, caplog):
    with caplog.at_level(logging.WARNING, logger="api.protocol"):
        for _ in range(3):
            response = client.chat.completions.create(
                model=MODEL, messages=USER, max_tokens=2, extra_body={"vllm_only_knob_a": 1, "knob_b": [2]}
            )
            assert response.choices[0].message.content is not None
    logged = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
    assert len(logged) == 2 and any("'vllm_only_knob_a'" in m for m in logged) and any("'knob_b'" in m for m in logged)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="api.protocol"):
        for _ in range(2):
            client.completions.create(
                model=MODEL, prompt="x", max_tokens=2, extra_body={"structured_outputs": {"choice": ["a"], "knob_c": 1}}
            )
    logged = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
    assert len(logged) == 1 and "'knob_c'" in logged[0] and "StructuredOutputsField" in logged[0]


def test_enable_log_requests_logs_each_request(engine, caplog):
    app = create_app(engine, shutdown_engine=False, options=ServerOptions(log_requests=True))
    with BackgroundServer(app) as logging_server, caplog.at_level(logging.INFO, logger="api"):
        logging_client = openai.OpenAI(base_url=f"{logging_server.url}/v1", api_key="unused", max_retries=0)
        logging_client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        logging_client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Received")]
    assert len(logged) == 2 and "max_tokens=2" in logged[0]


def test_cached_tokens_report_the_prefix_cache(client, tokenizer):
    prompt = "Prefix caching: " + " ".join(f"item {i}," for i in range(30))
    num_prompt = len(tokenizer.encode(prompt))
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == num_prompt
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Whole 16-token blocks, and never the last prompt token (its logits are needed).
    assert second.usage.prompt_tokens_details.cached_tokens == (num_prompt - 1) // 16 * 16 > 0
    chat = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=MODEL, messages=chat, max_tokens=2)
    streamed = list(
        client.chat.completions.create(
            model=MODEL, messages=chat, max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_system_fingerprint_is_in_every_response_and_chunk(client):
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    fingerprint = chat.system_fingerprint
    assert fingerprint and fingerprint.startswith("fp_")
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, stream=True))
    assert {c.system_fingerprint for c in chunks} == {fingerprint}
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).system_fingerprint == fingerprint


def test_chat_echo_prepends_the_last_assistant_message(client):
    messages = [*USER, {"role": "assistant", "content": "The sky is"}]
    base = {"model": MODEL, "messages": messages, "max_tokens": 8, **GREEDY}
    continuation = {"add_generation_prompt": False, "continue_final_message": True}
    plain = client.chat.completions.create(**base, extra_body=continuation).choices[0].message.content
    echoed = client.chat.completions.create(**base, extra_body={**continuation, "echo": True})
    assert echoed.choices[0].message.content == "The sky is" + plain
    chunks = client.chat.completions.create(**base, stream=True, extra_body={**continuation, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The sky is" + plain
    # Echo only repeats an assistant turn: after a user message there is nothing to continue.
    after_user = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, **GREEDY)
    echoed_user = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=8, **GREEDY, extra_body={"echo": True}
    )
    assert echoed_user.choices[0].message.content == after_user.choices[0].message.content


def test_a_request_may_bring_its_own_chat_template(client, tokenizer):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    expected = tokenizer.apply_chat_template(USER, chat_template=template, tokenize=True, return_dict=False)
    response = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2, extra_body={"chat_template": template}
    )
    assert response.usage.prompt_tokens == len(expected)
    bad = httpx.post(
        f"{client.base_url}chat/completions",
        json={"model": MODEL, "messages": USER, "chat_template": "{% for %}"},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template"


def test_bad_words_never_appear(client, tokenizer):
    kwargs = {"prompt": "Once upon a time", "max_tokens": 12, "logprobs": 0}
    plain = client.completions.create(model=MODEL, **GREEDY, **kwargs).choices[0]
    banned = plain.logprobs.tokens[0].strip() or plain.logprobs.tokens[1].strip()
    assert len(tokenizer.encode(banned, add_special_tokens=False)) == 1
    response = client.completions.create(model=MODEL, **GREEDY, **kwargs, extra_body={"bad_words": [banned]})
    banned_ids = {tokenizer.encode(banned)[0], tokenizer.encode(" " + banned)[0]}
    tokens = [tokenizer.convert_tokens_to_ids(t) for t in response.choices[0].logprobs.tokens]
    assert response.choices[0].text != plain.text
    assert not banned_ids & set(tokens), (banned, response.choices[0].logprobs.tokens)


def test_a_multi_token_bad_word_bans_its_last_token_only_after_the_rest():
    logits = torch.zeros(2, 10)
    logits[:, 7] = 5.0  # the favourite: the bad word's last token
    params = SamplingParams(temperature=0, bad_words_token_ids=[[3, 7]])
    rows = [SamplingRow(params, [1], [4, 3]), SamplingRow(params, [1], [3, 4])]
    assert Sampler(10)(logits, rows).token_ids.tolist() == [0, 7]  # banned after 3 only


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, tokenizer):
    prompt_ids = tokenizer.encode("A long prompt about the engine, the scheduler and the cache, repeated.")
    truncated = client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=6, **GREEDY, extra_body={"truncate_prompt_tokens": 5}
    )
    direct = client.completions.create(model=MODEL, prompt=prompt_ids[-5:], max_tokens=6, **GREEDY)
    assert truncated.usage.prompt_tokens == 5
    assert truncated.choices[0].text == direct.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2, extra_body={"truncate_prompt_tokens": 7}
    )
    assert chat.usage.prompt_tokens == 7


def test_max_logprobs_limits_requests(server, client):
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, logprobs=True, top_logprobs=5)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, logprobs=True, top_logprobs=6)
    assert error.value.body["param"] == "top_logprobs" and "at most 5" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=6)
    assert error.value.body["param"] == "logprobs"


def test_every_served_name_is_accepted_and_echoed(client):
    assert [m.id for m in client.models.list().data] == [MODEL, ALIAS]
    assert client.chat.completions.create(model=ALIAS, messages=USER, max_tokens=2).model == ALIAS
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=USER, max_tokens=2)


# ---- vLLM's routes -----------------------------------------------------------------------------


def test_tokenize_a_prompt_as_the_tokenizer_does(server, tokenizer):
    text = "Hello, wörld! 😀"
    body = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert body == {
        "count": len(ids),
        "max_model_len": 512,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids),
    }
    plain = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False) and plain["token_strs"] is None


def test_tokenize_chat_messages_through_the_chat_template(server, tokenizer):
    body = httpx.post(f"{server.url}/tokenize", json={"model": ALIAS, "messages": USER}).json()
    assert body["tokens"] == tokenizer.apply_chat_template(
        USER, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert body["count"] == len(body["tokens"])
    both = httpx.post(
        f"{server.url}/tokenize",
        json={"messages": USER, "add_generation_prompt": True, "continue_final_message": True},
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_detokenize_inverts_tokenize(server, tokenizer):
    text = "Round trip: ünïcödé ✨"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids}).json() == {"prompt": text}
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    wrong = httpx.post(f"{server.url}/detokenize", json={"model": "other", "tokens": [1]})
    assert wrong.status_code == 404


def test_version_and_ping(server):
    version = httpx.get(f"{server.url}/version").json()
    assert set(version) == {"version"} and version["version"]
    for method in ("GET", "POST"):
        ping = httpx.request(method, f"{server.url}/ping")
        assert ping.status_code == 200 and ping.content == b""


def test_cors_answers_preflights_per_allowed_origins(server, engine):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.options(
        f"{server.url}/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # vLLM's default: any origin, method and header.
    with TestClient(create_app(engine, shutdown_engine=False)) as default:
        answer = default.options("/v1/models", headers={"Origin": "https://any.example", **preflight})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"


def test_root_path_and_a_server_chat_template(engine, tokenizer):
    template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    app = create_app(engine, shutdown_engine=False, options=ServerOptions(root_path="/llm", chat_template=template))
    with TestClient(app) as client:
        assert client.get("/llm/v1/models").status_code == 200
        assert client.get("/openapi.json").json()["servers"] == [{"url": "/llm"}]
        tokens = client.post("/llm/tokenize", json={"messages": USER}).json()["tokens"]
    assert tokens == tokenizer.apply_chat_template(USER, chat_template=template, tokenize=True, return_dict=False)
    # Behind a proxy that keeps the prefix, /v1 under it is still protected by the API key.
    locked = create_app(engine, api_key="sk-x", shutdown_engine=False, options=ServerOptions(root_path="/llm"))
    with TestClient(locked) as client:
        assert client.get("/llm/v1/models").status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.get("/llm/v1/models", headers={"Authorization": "Bearer sk-x"}).status_code == 200
        # vLLM's tokenizer routes are guarded as /v1 is; the probes stay open.
        assert client.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert client.post("/llm/detokenize", json={"tokens": [1]}).status_code == 401
        assert client.get("/ping").status_code == 200 and client.get("/version").status_code == 200


def test_the_tokenizer_fixture_is_the_served_one(engine, model_dir_factory):
    # The oracles above read the engine's tokenizer; it must be the checkpoint's own.
    on_disk = AutoTokenizer.from_pretrained(model_dir_factory())
    assert engine.tokenizer.encode("check") == on_disk.encode("check")
