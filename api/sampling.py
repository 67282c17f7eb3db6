"""OpenAI request parameters -> engine SamplingParams (one place for the mapping and its checks)."""

from __future__ import annotations

from api.errors import APIError, bad_request_from_value_error
from api.protocol import SamplingFields
from engine.sampling_params import OutputKind, SamplingParams
from engine.structured_outputs import StructuredOutputsParams


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """Raises a 400 APIError naming the parameter for anything the engine would refuse."""
    top_p = 1.0 if request.top_p is None else request.top_p
    top_k = request.top_k or 0
    if top_p == 0.0:
        # OpenAI accepts top_p = 0: the nucleus shrinks to the single most likely token.
        top_p, top_k = 1.0, 1
    try:
        return SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=request.min_p or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            logit_bias=_logit_bias(request.logit_bias, vocab_size),
            min_tokens=request.min_tokens,
            max_tokens=max_tokens,
            stop=request.stop,
            stop_token_ids=_token_ids("stop_token_ids", request.stop_token_ids, vocab_size),
            ignore_eos=request.ignore_eos,
            seed=request.seed,
            logprobs=logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            # Deltas: each engine output carries just the new text, which is exactly an SSE chunk.
            output_kind=OutputKind.DELTA,
            structured_outputs=structured_outputs,
        )
    except ValueError as error:
        raise bad_request_from_value_error(error) from None


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
