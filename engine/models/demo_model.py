"""Tiny local models and a real byte-level BPE tokenizer, built without any model hub.

The tests build their models here, and `--model demo-random` (or the fallback when the real
default model's package is missing, see engine/models/builtin_models.py) serves `demo_model_path()`.
Weights are random, so the models talk noise; what matters is that the directories have exactly the
layout of a hub checkpoint (config.json, safetensors weights, tokenizer files with a chat template,
generation_config.json) and load through the same transformers code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.models.model_cache import build_once

# The name that selects it (`--model demo-random`) and that it is served as.
DEMO_MODEL_ID = "demo-random"
# Bump the suffix whenever the demo model's recipe changes, so stale caches are not reused.
DEMO_MODEL_DIR_NAME = "demo-model-v1"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

TOKENIZER_VOCAB_SIZE = 1536
# The GPT-4/Qwen2 word split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newlines and whitespace.
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Small multilingual corpus. Accented Latin, Greek, Cyrillic, CJK and emoji make sure some
# characters stay split over several byte-level tokens (rare ones never get merged), which is
# what the incremental detokenizer has to cope with. Chat markup and JSON are here so the
# template's scaffolding tokenizes into a few merged tokens rather than single bytes.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs away.
A continuous batching engine keeps the accelerator busy: every step carries the next token of
every running request, plus slices of new prompts. Keys and values live in fixed-size blocks.
When blocks run out, the newest request gives its blocks back and waits at the head of the queue.
Hello, world! How are you today? I am fine, thank you. What is the weather like in Paris?
It is sunny and warm; the river is calm, and people walk along the bridges in the evening.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 3.14159 2.71828 -1 +7 50% $19.99
Once upon a time, there was a little robot who wanted to learn how to write poems.
It read every book in the library, from history to mathematics, and then it began to write.
"Why is the sky blue?" asked the child. "Because of the way sunlight scatters," said the teacher.
def greet(name: str) -> str:
    return f"Hello, {name}!"

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
<tool_call>
{"name": "get_weather", "arguments": {"city": "Tokyo"}}
</tool_call>
<tool_response>
{"temperature": 21, "condition": "cloudy"}
</tool_response>
user: Can you help me plan a trip? assistant: Of course! Where would you like to go?
system: You are a helpful assistant. Answer briefly and politely.

Français : Le café est très chaud. Où est la bibliothèque ? Je voudrais un thé, s'il vous plaît.
L'été dernier, nous sommes allés à la mer ; c'était génial. Noël approche, les élèves sont ravis.
Español: ¿Dónde está la estación? ¡Qué día tan bonito! El niño comió una manzana y un plátano.
Mañana vamos a la montaña con mi señora y los niños. La canción es muy alegre.
Deutsch: Die Straße ist schön. Ich möchte ein Stück Käse und ein Glas Milch. Grüße aus München!
Über den Bergen schläft der Mond; die Bäume flüstern leise im Wind.
Português: A informação está no coração da cidade. Não há pão hoje, só maçãs e limões.
Čeština: Dobrý den, jak se máte? Příliš žluťoučký kůň úpěl ďábelské ódy.
Polski: Zażółć gęślą jaźń. Dzień dobry, dziękuję bardzo.
Türkçe: Günaydın! Çok teşekkür ederim. İstanbul'da hava güzel.
Ελληνικά: Καλημέρα! Η γλώσσα μου είναι ελληνική. Το φως του ήλιου είναι ζεστό και φωτεινό.
Ο σκύλος τρέχει στον κήπο και η γάτα κοιμάται στο παράθυρο. Ευχαριστώ πολύ, φίλε μου.
Русский: Привет, мир! Как дела? Сегодня хорошая погода, и мы идём гулять в парк.
Съешь же ещё этих мягких французских булок, да выпей чаю. Спасибо большое, до свидания.
Українська: Доброго ранку! Ґанок, їжак і євшан-зілля. Дякую!
中文：你好，世界！今天天气很好，我们去公园散步吧。学习语言需要时间和耐心。
我喜欢喝茶，也喜欢看书。这个模型很小，但是它可以说话。谢谢你的帮助！
日本語：こんにちは、世界！今日はいい天気ですね。桜の花がとても綺麗です。ありがとうございます。
한국어: 안녕하세요! 오늘 날씨가 좋네요. 감사합니다. 만나서 반갑습니다.
العربية: مرحبا بالعالم. شكرا جزيلا.
עברית: שלום עולם, תודה רבה.
हिन्दी: नमस्ते दुनिया, धन्यवाद।
Emoji: 😀 😃 🚀 🌍 ❤️ 👍 🎉 🐍 🔥 ✨ 🤖 🍕 ☕ 🌸 👩‍💻 🇫🇷 🇯🇵
Symbols: © ® ™ € £ ¥ ° ± × ÷ → ← ↑ ↓ ∞ ≈ ≠ ≤ ≥ √ ∑ π µ Ω — – … « » „ “ ” ‘ ’ • ¶ §
Math: ∀x ∈ ℝ, x² ≥ 0. E = mc². ∫₀¹ f(x) dx. α + β = γ; λ → ∞.
The engine streams text back to the client as soon as each token is sampled. Stop strings end a
request early; the text is cut before the stop string unless the request asks to keep it.
Tokens that split a character in half must wait for the rest of its bytes before they are shown.
Some more English to give the merges something to learn: the, and, of, to, in, is, that, for, it,
with, as, was, on, be, at, by, this, had, not, are, but, from, or, have, an, they, which, one, you,
were, her, all, she, there, would, their, we, him, been, has, when, who, will, more, no, if, out.
Machine learning models generate text one token at a time. A tokenizer turns text into numbers,
and a detokenizer turns the numbers back into text. Attention lets every token look at the others.
The server speaks the OpenAI protocol: chat completions, completions, models, and streaming events.
"""

# Qwen2.5-style ChatML template (our own wording). Tool definitions go into the system turn inside
# <tools></tools>; assistant tool calls render as <tool_call>{json}</tool_call>; consecutive tool
# results are grouped into one user turn of <tool_response> blocks, as Qwen models expect.
# Content may be a string or a list of OpenAI-style parts; only text parts are rendered.
CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{ content }}
{%- else -%}
{%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}
{{- render_content(messages[0].content) + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments' }}
{{- ' within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'tool' %}
{%- if loop.first or loop.previtem.role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' }}
{%- if loop.last or loop.nextitem.role != 'tool' %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}
{{- '\\n' + render_content(message.content) }}
{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- set call = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\\n<tool_call>\\n{"name": ' + (call.name | tojson) + ', "arguments": ' }}
{%- if call.arguments is string %}
{{- call.arguments }}
{%- else %}
{{- call.arguments | tojson }}
{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Default dimensions of the tiny test models: small enough to run a forward in about a millisecond
# on a CPU, but with grouped-query attention (4 query heads over 2 KV heads) and more than one layer.
TINY_MODEL_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
}

# The demo model: a small Qwen3 (about 13M parameters with the tokenizer above, tied embeddings).
DEMO_MODEL_DIMS: dict[str, Any] = {
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},  # as Qwen3
}

# model_type -> whether its small checkpoints tie the LM head to the embeddings (small Qwen models
# do, Llama and Mistral do not); the tiny models follow suit so the engine sees both layouts.
_TIED_BY_DEFAULT = {"llama": False, "qwen2": True, "qwen3": True, "mistral": False}
ARCHITECTURES = tuple(_TIED_BY_DEFAULT)

# With the stock init (std 0.02 everywhere) a small random model has nearly flat attention and
# logits dominated by the last token, so greedy decoding soon repeats one token. Scaling each
# projection to its fan-in keeps activations near unit size in every layer, so attention is
# peaked enough to depend on the context and the logits have a real spread.
_PROJECTION_GAIN = 2.0  # std * sqrt(fan_in) of every projection
_LOGIT_STD = 4.0  # std of the logits for a unit-RMS final hidden state


def build_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Trains the byte-level BPE tokenizer on the built-in corpus; same result on every call."""
    bpe = Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline, because transformers loads any model_type "qwen2" directory with
    # its Qwen2Tokenizer class, which rebuilds the normalizer and pre-tokenizer from code and
    # ignores ours. The byte-level decoder makes the decode of concatenated ids exactly the UTF-8
    # decode of the concatenated bytes, which the incremental detokenizer relies on.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_MODEL_DIMS["max_position_embeddings"],
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_model_dir(path: str | Path, arch: str = "llama", *, seed: int = 0, **config_overrides: Any) -> Path:
    """Saves a tiny random-weight `arch` model, its tokenizer and generation config into `path`.

    `config_overrides` go straight into the transformers config (e.g. num_hidden_layers=4,
    tie_word_embeddings=False); `seed` picks the random weights.
    """
    # Imported here so that users of the tokenizer alone (the detokenizer tests) skip the
    # modeling imports, about a second of CPU.
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if arch not in _TIED_BY_DEFAULT:
        raise ValueError(f"Invalid value for 'arch': must be one of {list(ARCHITECTURES)}, got {arch!r}")
    path = Path(path)
    tokenizer = build_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)

    settings: dict[str, Any] = {
        **TINY_MODEL_DIMS,
        "vocab_size": len(tokenizer),
        "tie_word_embeddings": _TIED_BY_DEFAULT[arch],
        # Qwen-style ids: <|endoftext|> doubles as BOS and pad, <|im_end|> ends a chat turn.
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
    }
    if arch in ("qwen2", "qwen3", "mistral"):
        # Full attention everywhere: the engine's paged attention has no sliding window.
        settings["sliding_window"] = None
    settings.update(config_overrides)
    config = AutoConfig.for_model(arch, **settings)

    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _init_weights(model)
    model.eval()

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(path))
    GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(str(path))
    return path


def demo_model_path() -> Path:
    """The built-in random demo model's directory, built on first use and reused afterwards.

    Lives in `$SLUICE_CACHE_DIR/demo-model-v1` (default `~/.cache/sluicegate/demo-model-v1`),
    built atomically (`engine.models.model_cache.build_once`).
    """
    return build_once(DEMO_MODEL_DIR_NAME, lambda tmp: build_model_dir(tmp, arch="qwen3", **DEMO_MODEL_DIMS))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng restores the caller's RNG state afterwards: building a model must not change what
    # an unrelated seeded computation in the same process draws next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _init_weights(model: torch.nn.Module) -> None:
    # Explicit init rather than each architecture's _init_weights, which differs between
    # transformers versions (and may skip tensors it considers already initialized).
    hidden_size = model.config.hidden_size
    tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.normal_(0.0, 0.1)
        elif "embed_tokens" in name:
            # Tied: the embedding is also the LM head, so it carries the logit scale. Untied:
            # unit-size token vectors, as the residual stream of a trained model roughly has.
            param.normal_(0.0, _LOGIT_STD / hidden_size**0.5 if tied else 1.0)
        elif name.startswith("lm_head"):
            param.normal_(0.0, _LOGIT_STD / hidden_size**0.5)
        else:
            param.normal_(0.0, _PROJECTION_GAIN / param.shape[1] ** 0.5)
