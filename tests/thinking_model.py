"""A tiny reasoning model for the vLLM-compatibility tests: the test tokenizer plus `<think>` and
`</think>` as single (non-special) tokens, as in Qwen3's vocabulary, and a ChatML template with
Qwen3's thinking switch (`enable_thinking: false` writes an empty, closed block into the prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from engine.models.demo_model import CHAT_TEMPLATE, build_model_dir, build_tokenizer

_GENERATION_PROMPT = """{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Qwen3's switch, in its own words: thinking is on unless the request turns it off.
QWEN3_STYLE_TEMPLATE = CHAT_TEMPLATE.replace(
    _GENERATION_PROMPT,
    """{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
""",
)
assert QWEN3_STYLE_TEMPLATE != CHAT_TEMPLATE, "the demo template's generation prompt changed"


def build_thinking_model_dir(path: Path, **config_overrides: Any) -> Path:
    """A tiny qwen3 model whose vocabulary has the two thinking markers (the last two ids)."""
    num_markers = 2
    build_model_dir(path, "qwen3", vocab_size=len(build_tokenizer()) + num_markers, **config_overrides)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.add_tokens(["<think>", "</think>"]) == num_markers
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path
