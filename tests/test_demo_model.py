"""The locally built tokenizer and tiny models behave like hub checkpoints."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import engine.models.demo_model as demo_model
from engine.models.demo_model import (
    ARCHITECTURES,
    DEMO_MODEL_ID,
    IM_END,
    IM_START,
    PAD_TOKEN,
    TINY_MODEL_DIMS,
    build_model_dir,
    build_tokenizer,
    demo_model_path,
)

MULTILINGUAL = [
    "Le café est très chaud, l'été à Noël.",
    "Grüße aus München: Straße, Käse, Bäume.",
    "Καλημέρα! Η γλώσσα μου είναι ελληνική.",
    "Привет, мир! Съешь же ещё этих мягких булок.",
    "你好，世界！我喜欢喝茶。薔薇と漢字は珍しい。",
    "안녕하세요 😀🚀👩‍💻🇯🇵 ∀x ∈ ℝ, x² ≥ 0",
    "  leading spaces, tabs\tand\nnew lines\n\n",
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_dir_loads_like_a_hub_checkpoint(model_dir_factory, arch: str) -> None:
    path = model_dir_factory(arch)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.model_type == arch
    assert model.dtype == torch.float32
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    for key, value in TINY_MODEL_DIMS.items():
        assert getattr(config, key) == value, key
    assert config.vocab_size == len(tokenizer)

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token_id == im_end
    assert tokenizer.pad_token == PAD_TOKEN
    assert config.eos_token_id == im_end
    generation_config = GenerationConfig.from_pretrained(path)
    assert generation_config.eos_token_id == im_end
    assert generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_is_varied(model_dir_factory, arch: str) -> None:
    path = model_dir_factory(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    outputs = []
    for prompt in ["Hello, world!", "Le café est très chaud.", "你好，世界！"]:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(input_ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
        new_ids = generated[0, input_ids.shape[1] :].tolist()
        # A degenerate random model repeats one token or a 2-cycle; we want real spread.
        assert len(set(new_ids)) >= 6, new_ids
        outputs.append(new_ids)
    assert len({tuple(ids) for ids in outputs}) == len(outputs)


def test_model_build_is_deterministic_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next_draw = torch.rand(1)
    torch.manual_seed(123)
    first = build_model_dir(tmp_path / "a", "qwen3")
    assert torch.equal(torch.rand(1), expected_next_draw)

    second = build_model_dir(tmp_path / "b", "qwen3")
    first_weights = load_file(first / "model.safetensors")
    second_weights = load_file(second / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()

    reseeded = load_file(build_model_dir(tmp_path / "c", "qwen3", seed=1) / "model.safetensors")
    assert not torch.equal(reseeded["model.embed_tokens.weight"], first_weights["model.embed_tokens.weight"])


def test_config_overrides_reach_the_model(model_dir_factory) -> None:
    path = model_dir_factory("llama", num_hidden_layers=3, tie_word_embeddings=True)
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert config.num_hidden_layers == 3
    assert config.tie_word_embeddings


def test_unknown_architecture_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'arch'"):
        build_model_dir(tmp_path, "gpt2")


def test_tokenizer_training_is_deterministic(tokenizer) -> None:
    rebuilt = build_tokenizer()
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    assert 1000 <= len(tokenizer) <= 2000


def test_special_tokens_are_single_ids(tokenizer) -> None:
    for token in (PAD_TOKEN, IM_START, IM_END):
        ids = tokenizer.encode(token)
        assert ids == [tokenizer.convert_tokens_to_ids(token)]
    assert set(tokenizer.all_special_tokens) == {PAD_TOKEN, IM_START, IM_END}
    text = f"{IM_START}user\nhi{IM_END}"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_tokenizer_round_trips_non_ascii_text(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_some_characters_are_split_across_tokens(tokenizer) -> None:
    # The detokenizer tests are only meaningful if tokens can end in the middle of a character.
    split_chars = []
    for char in sorted(set("".join(MULTILINGUAL))):
        ids = tokenizer.encode(char)
        if len(char.encode()) > 1 and len(ids) > 1:
            split_chars.append(char)
            assert all("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert {"😀", "🚀", "薔"} <= set(split_chars), split_chars


def test_chat_template_renders_roles_and_generation_prompt(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Où est "}, {"type": "text", "text": "Paris"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nOù est Paris<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert without == "<|im_start|>user\nHi!<|im_end|>\n"


def test_chat_template_renders_tools_calls_and_results(tokenizer) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                # OpenAI clients send arguments as a JSON string; other callers pass a dict.
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "21C"},
        {"role": "tool", "tool_call_id": "2", "content": "18C"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert prompt.count("<|im_start|>system") == 1
    assert (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call><|im_end|>\n'
    ) in prompt
    assert (
        "<|im_start|>user\n<tool_response>\n21C\n</tool_response>\n"
        "<tool_response>\n18C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in prompt

    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages[:1]], tools=tools, tokenize=False
    )
    assert with_system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert with_system.count("Be brief.") == 1


def test_demo_model_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    path = demo_model_path()
    assert path == tmp_path / "demo-model-v1"
    assert demo_model_path() == path
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model-v1"]  # no temp dirs left behind

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type in ("qwen3", "llama")
    assert 10e6 <= model.num_parameters() <= 20e6
    assert AutoTokenizer.from_pretrained(path).chat_template
    assert DEMO_MODEL_ID == "demo-random"


def test_concurrent_first_uses_of_the_demo_model_agree(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    all_started = threading.Barrier(4)

    def slow_fake_build(path: Path, arch: str, **overrides: object) -> Path:
        # Every caller starts building before any finishes: the worst case for the rename race.
        all_started.wait(timeout=10)
        (Path(path) / "config.json").write_text(f'{{"builder": {threading.get_ident()}}}')
        return Path(path)

    monkeypatch.setattr(demo_model, "build_model_dir", slow_fake_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo_model_path())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 4 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model-v1"]
    assert (results[0] / "config.json").is_file()
