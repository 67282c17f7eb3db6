"""Engine TokenLogprobs -> OpenAI's two logprobs shapes (chat `content` list, legacy parallel lists)."""

from __future__ import annotations

import math
from typing import Any

from engine.outputs import TokenLogprob

# JSON has no -inf; a token the sampler masked out (top_k, logit_bias -100) still needs a number.
_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class TokenText:
    """Each token id's text on its own, decoded once and cached (the vocabulary bounds the cache)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    content = []
    for entry in entries:
        text = token_text(entry.token_id)
        content.append(
            {
                "token": text,
                "logprob": _finite(entry.logprob),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (t := token_text(tid)),
                        "logprob": _finite(lp),
                        "bytes": list(t.encode("utf-8")),
                    }
                    for tid, lp in entry.top_logprobs
                ],
            }
        )
    return {"content": content}


class CompletionLogprobsBuilder:
    """Accumulates the legacy `logprobs` object of one choice; offsets continue across chunks."""

    def __init__(self, token_text: TokenText, start_offset: int = 0) -> None:
        self.token_text = token_text
        self.offset = start_offset

    def build(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for entry in entries:
            text = self.token_text(entry.token_id)
            tokens.append(text)
            token_logprobs.append(_finite(entry.logprob))
            top = {self.token_text(tid): _finite(lp) for tid, lp in entry.top_logprobs}
            # The sampled token is always listed, as OpenAI does, even when it is not in the top k.
            top.setdefault(text, _finite(entry.logprob))
            top_logprobs.append(top)
            text_offset.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key, values in merged.items():
            values.extend(part[key])
    return merged
