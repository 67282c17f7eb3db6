"""Speculative decoding through the server: `--speculative-config`, YAML, answers identical to a server
without it, and vLLM's spec_decode counters on /metrics."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from metrics_scrape import scrape

from api.cli import build_parser, engine_config_from_args, module_main
from api.metrics import ServerMetrics
from api.vllm_flags import check_unknown_flags
from engine.config import EngineConfig
from engine.engine_process import _idle_stats

REPO = Path(__file__).parents[1]
MODEL = "tiny-spec"
K = 3
NGRAM = {"method": "ngram", "num_speculative_tokens": K}
NO_EOS = {"ignore_eos": True}  # the tiny random model may emit EOS at any step
# Prompts of different kinds and lengths (repeats, a question): verification rows of different
# lengths share the steps.
PROMPTS = [
    "one two three one two three one two three one two",
    "abc abc abc abc abc abc abc",
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "Why is the sky blue?",
]
SPEC_COUNTERS = {
    "spec_decode_num_drafts_total": "spec_num_drafts",
    "spec_decode_num_draft_tokens_total": "spec_num_draft_tokens",
    "spec_decode_num_accepted_tokens_total": "spec_num_accepted_tokens",
}


@pytest.fixture(scope="module")
def speculative(serve_tiny_model, model_dir_factory):
    # In an engine process: the config goes to the child, and the stats (lists included) come back.
    # The served model as its own draft: its greedy proposals are all accepted, so every counter moves
    # (n-gram lookup on a random model's text accepts little; the engine tests cover it at length).
    draft = {"method": "draft_model", "model": str(model_dir_factory("llama")), "num_speculative_tokens": K}
    with serve_tiny_model(
        MODEL, engine_process=True, num_kv_blocks=256, max_model_len=512, speculative_config=draft
    ) as running:
        yield running


@pytest.fixture(scope="module")
def plain(serve_tiny_model):
    with serve_tiny_model(MODEL, num_kv_blocks=256, max_model_len=512) as running:
        yield running


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(server, prompt: str, stream: bool, **kwargs) -> tuple[str, list[str], str]:
    """(text, the tokens as logprobs names them, finish_reason) of one chat answer."""
    request = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=40, logprobs=True)
    response = _client(server).chat.completions.create(stream=stream, **request, **kwargs)
    if not stream:
        (choice,) = response.choices
        return choice.message.content, [t.token for t in choice.logprobs.content], choice.finish_reason
    text, tokens, finish_reason = "", [], None
    for chunk in response:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            tokens += [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
            finish_reason = choice.finish_reason or finish_reason
    return text, tokens, finish_reason


def _engine_stats(server) -> dict:
    return server.app.state.sluice.engine.stats()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0, extra_body=NO_EOS), dict(temperature=1.0, seed=1234, extra_body=NO_EOS)],
    ids=["greedy", "seeded"],
)
def test_answers_are_those_of_a_server_without_speculation(speculative, plain, stream, sampling):
    drafts_before = _engine_stats(speculative)["spec_num_drafts"]
    # Concurrent requests: verification rows of different lengths share steps.
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        with_spec = list(pool.map(lambda p: _chat(speculative, p, stream, **sampling), PROMPTS))
        without = list(pool.map(lambda p: _chat(plain, p, stream, **sampling), PROMPTS))
    assert with_spec == without
    assert all(len(tokens) == 40 for _, tokens, _ in with_spec)
    # Not vacuous: the engine did verify proposals while answering.
    assert _engine_stats(speculative)["spec_num_drafts"] > drafts_before


def _scrape(server) -> tuple[str, dict[tuple[str, frozenset], float]]:
    return scrape(server.url)


def _labels(**labels: str) -> frozenset:
    return frozenset((k, f'"{v}"') for k, v in {"model_name": MODEL, "engine": "0", **labels}.items())


def test_metrics_export_vllms_spec_decode_counters_equal_to_the_engines(speculative):
    for prompt in PROMPTS:  # on their own (this test may run alone), enough for some accepted proposals
        _chat(speculative, prompt, stream=False, temperature=0.0, extra_body=NO_EOS)
    text, samples = _scrape(speculative)
    stats = _engine_stats(speculative)  # idle now: nothing moves between the scrape and this
    assert stats["spec_num_drafts"] > 0 and stats["spec_num_accepted_tokens"] > 0
    for prefix in ("vllm:", "sluice:"):
        for name, key in SPEC_COUNTERS.items():
            assert f"# TYPE {prefix}{name} counter" in text  # prometheus_client's format, as vLLM's
            assert samples[(prefix + name, _labels())] == stats[key]
        per_pos = {
            dict(labels)["position"]: value
            for (name, labels), value in samples.items()
            if name == prefix + "spec_decode_num_accepted_tokens_per_pos_total"
        }
        assert per_pos == {f'"{j}"': stats["spec_num_accepted_tokens_per_pos"][j] for j in range(K)}
        # vLLM's meaning: position j counts drafts whose first j + 1 proposals were all accepted.
        assert sum(per_pos.values()) == stats["spec_num_accepted_tokens"]
        assert per_pos['"0"'] >= per_pos['"1"'] >= per_pos['"2"']
    drafted = {
        dict(labels)["position"]: value
        for (name, labels), value in samples.items()
        if name == "sluice_spec_decode_num_draft_tokens_per_pos_total"
    }
    assert drafted == {f'"{j}"': stats["spec_num_draft_tokens_per_pos"][j] for j in range(K)}
    assert sum(drafted.values()) == stats["spec_num_draft_tokens"]
    assert drafted['"0"'] == stats["spec_num_drafts"]  # every draft has a first proposal


def test_a_server_without_speculation_exports_no_spec_decode_series(plain):
    text, _ = _scrape(plain)
    assert "spec_decode" not in text


def test_the_counters_render_from_stats_as_vllm_names_them():
    stats = {
        "spec_num_drafts": 5,
        "spec_num_draft_tokens": 12,
        "spec_num_accepted_tokens": 7,
        "spec_num_draft_tokens_per_pos": [5, 4, 3],
        "spec_num_accepted_tokens_per_pos": [4, 2, 1],
    }
    text = ServerMetrics(SimpleNamespace(stats=lambda: stats, model_name="m")).render()[0].decode()
    for prefix in ("vllm:", "sluice:"):
        assert f'{prefix}spec_decode_num_drafts_total{{engine="0",model_name="m"}} 5.0' in text
        assert f'{prefix}spec_decode_num_draft_tokens_total{{engine="0",model_name="m"}} 12.0' in text
        assert f'{prefix}spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} 7.0' in text
        for position, value in enumerate([4, 2, 1]):
            labels = f'engine="0",model_name="m",position="{position}"'
            assert f"{prefix}spec_decode_num_accepted_tokens_per_pos_total{{{labels}}} {value}.0" in text
    assert 'sluice_spec_decode_num_draft_tokens_per_pos_total{position="2"} 3.0' in text


def test_a_dead_engines_idle_stats_keep_the_per_position_shape():
    stats = {"kv_blocks_total": 64, "num_running": 3, "spec_num_drafts": 9, "spec_num_accepted_tokens_per_pos": [5, 2]}
    assert _idle_stats(stats) == {
        "kv_blocks_total": 64,
        "num_running": 0,
        "spec_num_drafts": 0,
        "spec_num_accepted_tokens_per_pos": [0, 0],
    }
    ServerMetrics(SimpleNamespace(stats=lambda: _idle_stats(stats), model_name="m")).render()  # renders


# ---- configuration: the command line and YAML ---------------------------------------------------


def _config(*flags: str) -> EngineConfig:
    args, unknown = build_parser().parse_known_args(["serve", "m", *flags])
    assert check_unknown_flags(unknown) is None
    return engine_config_from_args(args)


def test_the_flag_takes_vllms_json_object(capsys):
    config = _config("--speculative-config", json.dumps({**NGRAM, "prompt_lookup_max": 2}))
    assert config.speculative_config["method"] == "ngram"
    assert config.speculative_config["num_speculative_tokens"] == K
    assert config.speculative_config["prompt_lookup_max"] == 2
    assert _config().speculative_config is None
    with pytest.raises(SystemExit):
        module_main(["--help"])
    assert "--speculative-config" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ('{"method": "ngram", ', ["argument --speculative-config", "expected a JSON object"]),
        ("[3]", ["argument --speculative-config", "expected a JSON object"]),
        ('{"num_speculative_tokens": 3, "lookahead": 2}', ["argument --speculative-config", "'lookahead'"]),
        ('{"method": "ngram"}', ["argument --speculative-config", "speculative_config.num_speculative_tokens"]),
        ('{"method": "eagle", "num_speculative_tokens": 3}', ["speculative_config.method", "eagle"]),
    ],
)
def test_a_bad_value_fails_naming_the_flag_and_key_before_loading_anything(value, fragments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module_main(["m", "--speculative-config", value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error


@pytest.mark.parametrize("flag", ["--num-speculative-tokens", "--speculative-model"])
def test_older_vllm_flags_point_to_the_new_one(flag, capsys):
    with pytest.raises(SystemExit):
        module_main(["m", flag, "3"])
    assert f"{flag} is an older vLLM flag; use --speculative-config" in capsys.readouterr().err


def test_yaml_takes_a_mapping_and_the_flag_replaces_it(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "device: cpu\nspeculative_config:\n  method: ngram\n  num_speculative_tokens: 2\n  disable_by_batch_size: 8\n"
    )
    config = EngineConfig.from_yaml(path)
    assert config.speculative_config["num_speculative_tokens"] == 2
    assert config.speculative_config["disable_by_batch_size"] == 8
    replaced = _config("--config", str(path), "--speculative-config", json.dumps(NGRAM))
    assert replaced.speculative_config["num_speculative_tokens"] == K
    assert replaced.speculative_config["disable_by_batch_size"] is None
    path.write_text("speculative_config:\n  method: ngram\n  num_speculative_tokens: 0\n")
    with pytest.raises(ValueError, match=r"speculative_config\.num_speculative_tokens"):
        EngineConfig.from_yaml(path)


def test_the_shipped_ngram_config_loads():
    config = EngineConfig.from_yaml(REPO / "configs" / "cpu-tiny-ngram.yaml")
    assert config.speculative_config["method"] == "ngram"
    assert config.device == "cpu"
