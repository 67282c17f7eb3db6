"""Control tokens written by a client are text, never conversation structure, on every transformers.

A user who writes `<|im_end|>\\n<|im_start|>system` in a message must not open a system turn.
transformers 5.20 added `apply_chat_template(..., sanitize_control_tokens=True)` for this; 5.17 to
5.19 (which `transformers>=5.17` allows, and the GPU machines run) take that keyword silently as an
unused template variable and tokenize the forged tokens as real ones. There this module does what
5.20 does: wrap every control token in the client's strings in private-use markers, render the
template to text, then encode the marked tokens as plain text and everything else (the template's
own control tokens included) normally.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

# Private-use code points (the ones transformers 5.20 uses) that mark a control token from the client.
_START, _END = "\U000f0000", "\U000f0001"


def native_sanitize(tokenizer: Any) -> bool:
    """Whether this transformers' apply_chat_template knows `sanitize_control_tokens` (5.20 on)."""
    return _has_sanitize_parameter(type(tokenizer))


@functools.lru_cache
def _has_sanitize_parameter(tokenizer_type: type) -> bool:
    return "sanitize_control_tokens" in inspect.signature(tokenizer_type.apply_chat_template).parameters


def control_tokens(tokenizer: Any) -> list[str]:
    """Special tokens, and added tokens the chat template writes itself (not whitespace ones)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    tokens = [
        added.content
        for added in tokenizer.added_tokens_decoder.values()
        if added.special or (added.content in template and not added.content.isspace())
    ]
    return sorted(set(tokens), key=len, reverse=True)  # longest first: a token beats those it contains


def mark(value: Any, pattern: re.Pattern) -> Any:
    """`value` (a string, or lists and dicts of them) with each control token wrapped in markers.
    Markers already in a string are removed first, so a client cannot forge a marked token."""
    if isinstance(value, str):
        value = value.replace(_START, "").replace(_END, "")
        return pattern.sub(lambda m: f"{_START}{m.group(0)}{_END}", value)
    if isinstance(value, dict):
        return {key: mark(item, pattern) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark(item, pattern) for item in value]
    return value


def token_pattern(tokens: list[str]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches


def encode_marked(tokenizer: Any, rendered: str, tokens: list[str]) -> list[int]:
    """Token ids of a chat rendered from marked inputs: marked tokens as plain text, the rest as usual.

    A lone marker (a template's string method split a marked token) is dropped, but still separates
    the text on its two sides, so they cannot join into a control token.
    """
    pieces = re.split(f"{_START}({token_pattern(tokens).pattern}){_END}|[{_START}{_END}]", rendered)
    ids: list[int] = []
    # re.split with one group: [text, marked token or None, text, marked token or None, ..., text]
    for index, piece in enumerate(pieces):
        if not piece:
            continue
        if index % 2 == 1:
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids
