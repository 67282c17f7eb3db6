"""Engine TokenLogprobs -> OpenAI's two logprobs shapes (chat `content` list, legacy parallel lists)."""

from __future__ import annotations

import math
import re
from typing import Any

from engine.outputs import TokenLogprob

# JSON has no -inf; a token the sampler masked out (top_k, logit_bias -100) still needs a number.
_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class TokenText:
    """Each token id's text and raw bytes on its own, computed once and cached (the vocabulary
    bounds the caches).

    The text of a token that holds part of a multi-byte character decodes to U+FFFD; its bytes are
    still exact (from the byte-level vocabulary, or a `<0xNN>` byte-fallback token), which is what
    OpenAI's `bytes` field is for: clients join them to rebuild the characters.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._byte_level = _is_byte_level(tokenizer)

    def __call__(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._text[token_id] = text
        return text

    def raw_bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = list(self._raw_bytes(token_id))
            self._bytes[token_id] = raw
        return raw

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            if (
                self._byte_level
                and token_id not in self.tokenizer.all_special_ids
                and all(c in _BYTE_DECODER for c in piece)
            ):
                return bytes(_BYTE_DECODER[c] for c in piece)
        return self(token_id).encode("utf-8")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table, which byte-level BPE vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    content = []
    for entry in entries:
        content.append(
            {
                "token": token_text(entry.token_id),
                "logprob": _finite(entry.logprob),
                # The token's own bytes, not its text's: part of a character decodes to U+FFFD.
                "bytes": token_text.raw_bytes(entry.token_id),
                "top_logprobs": [
                    {"token": token_text(tid), "logprob": _finite(lp), "bytes": token_text.raw_bytes(tid)}
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


def echoed_prompt_logprobs(
    prompt_token_ids: list[int], entries: list[TokenLogprob | None], builder: CompletionLogprobsBuilder
) -> dict[str, Any]:
    """The legacy `logprobs` of an echoed prompt: the first token's logprob and alternatives are null
    (nothing predicts it), as in OpenAI's and vLLM's answers."""
    first_text = builder.token_text(prompt_token_ids[0])
    head = {"tokens": [first_text], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [builder.offset]}
    builder.offset += len(first_text)
    rest = builder.build([entry for entry in entries[1:] if entry is not None])
    return merge_completion_logprobs([head, rest])


def vllm_prompt_logprobs(entries: list[TokenLogprob | None], token_text: TokenText) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), {token id: {logprob, rank,
    decoded_token}} for the token itself and its top alternatives (ranks 1..k)."""
    result: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        by_id = {
            str(token_id): {"logprob": _finite(lp), "rank": rank, "decoded_token": token_text(token_id)}
            for rank, (token_id, lp) in enumerate(entry.top_logprobs, start=1)
        }
        by_id[str(entry.token_id)] = {
            "logprob": _finite(entry.logprob),
            "rank": entry.rank,
            "decoded_token": token_text(entry.token_id),
        }
        result.append(by_id)
    return result
