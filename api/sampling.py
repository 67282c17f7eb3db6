"""OpenAI request parameters -> engine SamplingParams (one place for the mapping and its checks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api.errors import APIError, bad_request_from_value_error
from api.protocol import SamplingFields
from engine.sampling.sampling_params import OutputKind, SamplingParams
from engine.sampling.structured_outputs import StructuredOutputsParams


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    structured_outputs: StructuredOutputsParams | None = None,
    tokenizer: Any = None,
    prompt_logprobs: int | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """Raises a 400 APIError naming the parameter for anything the engine would refuse.

    `tokenizer` turns `bad_words` into token ids (a request with bad_words needs it); `defaults` are the
    server's values for fields the request leaves out (--generation-config), else OpenAI's apply.
    """
    defaults = defaults or {}

    def given(name: str, fallback: Any) -> Any:
        value = getattr(request, name)
        return value if value is not None else defaults.get(name, fallback)

    top_p = given("top_p", 1.0)
    top_k = given("top_k", 0) or 0
    if top_p == 0.0:
        # OpenAI accepts top_p = 0: the nucleus shrinks to the single most likely token.
        top_p, top_k = 1.0, 1
    try:
        return SamplingParams(
            n=request.n,
            temperature=given("temperature", 1.0),
            top_p=top_p,
            top_k=top_k,
            min_p=given("min_p", 0.0),
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=given("repetition_penalty", 1.0),
            logit_bias=_logit_bias(request.logit_bias, vocab_size),
            min_tokens=request.min_tokens,
            max_tokens=max_tokens if max_tokens is not None else defaults.get("max_tokens"),
            stop=request.stop,
            stop_token_ids=_token_ids("stop_token_ids", request.stop_token_ids, vocab_size),
            ignore_eos=request.ignore_eos,
            seed=request.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            # Deltas: each engine output carries just the new text, which is exactly an SSE chunk.
            output_kind=OutputKind.DELTA,
            structured_outputs=structured_outputs,
            bad_words_token_ids=bad_words_token_ids(tokenizer, request.bad_words) if request.bad_words else None,
        )
    except ValueError as error:
        raise bad_request_from_value_error(error) from None


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """vLLM's reading of bad_words: each word as it tokenizes alone, and (when that differs in its first
    token but not in length) with a leading space, as it tokenizes after another word."""
    sequences: list[list[int]] = []
    for word in words:
        if not word.strip():
            raise APIError(400, "Invalid value for 'bad_words': words must not be empty.", param="bad_words")
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        sequences.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            sequences.append(spaced)
    return sequences


def truncate_prompt(prompt_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (k = -1: max_model_len; 0 is refused)."""
    if truncate_prompt_tokens is None:
        return prompt_ids
    if truncate_prompt_tokens == 0:
        raise APIError(
            400,
            "Invalid value for 'truncate_prompt_tokens': must be >= 1, or -1 for the model's context length.",
            param="truncate_prompt_tokens",
        )
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return prompt_ids[-keep:]


def check_max_logprobs(param: str, value: int | None, limit: int) -> None:
    """--max-logprobs: the server's limit on top_logprobs / logprobs (at most the engine's)."""
    if value is not None and value > limit:
        raise APIError(
            400, f"Invalid value for '{param}': at most {limit} logprobs on this server, got {value}.", param=param
        )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    result = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(
                400,
                f"Invalid value for 'logit_bias': keys must be token ids, got {key!r}",
                param="logit_bias",
            ) from None
        _check_token_id("logit_bias", token_id, vocab_size)
        result[token_id] = value
    return result


def _token_ids(param: str, ids: list[int] | None, vocab_size: int) -> list[int] | None:
    for token_id in ids or ():
        _check_token_id(param, token_id, vocab_size)
    return ids


def _check_token_id(param: str, token_id: int, vocab_size: int) -> None:
    if not 0 <= token_id < vocab_size:
        raise APIError(
            400,
            f"Invalid value for '{param}': token id {token_id} is outside the vocabulary [0, {vocab_size})",
            param=param,
        )


def check_stream_options(request: SamplingFields) -> None:
    if request.stream_options is not None and not request.stream:
        raise APIError(
            400,
            "Invalid value for 'stream_options': only allowed when 'stream' is true.",
            param="stream_options",
        )
