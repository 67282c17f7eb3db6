"""POST /v1/completions: legacy text completions (text or token-id prompts, echo, int logprobs)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.errors import APIError, not_supported
from api.generation import (
    ClientDisconnected,
    EngineStream,
    cancel_on_disconnect,
    close_all,
    merge_streams,
    new_id,
    now_s,
    open_streams,
)
from api.logprobs import (
    CompletionLogprobsBuilder,
    echoed_prompt_logprobs,
    merge_completion_logprobs,
    vllm_prompt_logprobs,
)
from api.protocol import CompletionRequest, CompletionResponse
from api.routing import ThreadedBodyRoute
from api.sampling import build_sampling_params, check_max_logprobs, check_stream_options, truncate_prompt
from api.state import ServerState, error_responses, get_state, stream_content, usage_body
from api.streaming import SSE_DONE, SSEResponse, sse_event
from api.structured import request_constraint
from engine.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)
router = APIRouter(route_class=ThreadedBodyRoute)

MAX_PROMPTS = 1024  # prompts in one request; each becomes an engine request


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: stream_content(CompletionResponse), **error_responses(400, 401, 404, 429, 500, 503)},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    arrival_time = time.monotonic()
    state = get_state(request)
    state.check_model(body.model)
    check_stream_options(body)
    if body.suffix:
        raise not_supported("suffix", "'suffix' (fill-in-the-middle)")
    if body.best_of is not None and body.best_of != body.n:
        raise not_supported("best_of", "'best_of' different from 'n'")
    if body.max_tokens == 0 and not body.echo:
        message = "Invalid value for 'max_tokens': 0 is only allowed with 'echo' (to score the prompt)."
        raise APIError(400, message, param="max_tokens")
    check_max_logprobs("logprobs", body.logprobs, state.options.max_logprobs)
    check_max_logprobs("prompt_logprobs", body.prompt_logprobs, state.options.max_logprobs)
    constraint, constraint_param = request_constraint(body)
    # echo with logprobs scores the prompt too (lm-eval-harness), as does vLLM's prompt_logprobs.
    wanted = [k for k in (body.logprobs if body.echo else None, body.prompt_logprobs) if k is not None]
    params = build_sampling_params(
        body,
        # max_tokens 0 (scoring only): the engine samples one token, which the answer leaves out.
        max_tokens=1 if body.max_tokens == 0 else body.max_tokens,
        prompt_logprobs=max(wanted) if wanted else None,
        logprobs=body.logprobs,
        vocab_size=state.vocab_size,
        structured_outputs=constraint,
        tokenizer=state.engine.tokenizer,
        defaults=state.options.sampling_defaults,
    )
    # Tokenizing megabytes of text takes seconds: off the event loop, which serves everyone.
    prompts = await asyncio.to_thread(_prompt_token_ids, state, body.prompt)
    truncate = body.truncate_prompt_tokens
    prompts = [truncate_prompt(p, truncate, state.max_model_len) for p in prompts]
    if state.options.log_requests:
        logger.info("Received completion request: %s prompts, params: %s", [len(p) for p in prompts], params)
    try:
        streams = await cancel_on_disconnect(
            request,
            open_streams(
                state.engine,
                prompts,
                params,
                metrics=state.metrics,
                admission=state.admission,
                arrival_time=arrival_time,
                prompt_param="prompt",
                param_renames={"structured_outputs": constraint_param},
            ),
        )
    except ClientDisconnected:
        return Response(status_code=499)
    run = _CompletionRun(state, body, prompts, streams)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(run.events(include_usage), on_close=lambda: close_all(streams))
    try:
        return await cancel_on_disconnect(request, run.collect())
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await close_all(streams)


def _prompt_token_ids(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Every prompt form as a list of token-id prompts (one engine request each)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]  # type: ignore[list-item]
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"Invalid value for 'prompt': at most {MAX_PROMPTS} prompts per request.", param="prompt")
    tokenizer = state.engine.tokenizer
    # Raw text gets the tokenizer's usual special tokens (a BOS for Llama-style models): the model
    # was trained on text that starts that way. Token ids are the client's exact choice.
    return [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in prompt]


class _CompletionRun:
    """One request's choices: prompt i, sample j is choice i * n + j."""

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        prompts: list[list[int]],
        streams: list[EngineStream],
    ) -> None:
        self.state = state
        self.body = body
        self.prompts = prompts
        self.streams = streams
        self.id = new_id("cmpl")
        self.created = now_s()
        n = body.n
        self.echo_text = [self._echo(i) for i in range(len(prompts))]
        # The echoed prompt's logprobs (echo with logprobs) start the choice's, at offset 0; otherwise the
        # generated tokens' offsets start after the echoed text.
        self.echo_logprobs = body.echo and body.logprobs is not None
        self.score_only = body.max_tokens == 0  # the answer is the echoed prompt alone
        self.logprobs = [
            CompletionLogprobsBuilder(state.token_text, 0 if self.echo_logprobs else len(self.echo_text[i // n]))
            for i in range(len(prompts) * n)
        ]
        self.prompt_entries: list[list[Any] | None] = [None] * len(prompts)  # each prompt's prompt logprobs

    def _echo(self, prompt_index: int) -> str:
        if not self.body.echo:
            return ""
        prompt = self.body.prompt
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            return prompt[prompt_index]  # type: ignore[return-value]
        return self.state.engine.tokenizer.decode(self.prompts[prompt_index], skip_special_tokens=False)

    def _note_prompt_logprobs(self, position: int, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_entries[position] = output.prompt_logprobs

    def _piece(self, position: int, index: int, completion: CompletionOutput, first: bool) -> dict[str, Any]:
        """A choice's new text and logprobs from one engine output; its first piece starts with the echo."""
        text = "" if self.score_only else completion.text
        parts = []
        piece: dict[str, Any] = {}
        if first:
            text = self.echo_text[position] + text
            entries = self.prompt_entries[position]
            if self.echo_logprobs:
                parts.append(echoed_prompt_logprobs(self.prompts[position], entries, self.logprobs[index]))
            if self.body.prompt_logprobs is not None:
                piece["prompt_logprobs"] = vllm_prompt_logprobs(entries, self.state.token_text)
        if completion.logprobs and not self.score_only:
            parts.append(self.logprobs[index].build(completion.logprobs))
        piece["text"] = text
        piece["logprobs"] = merge_completion_logprobs(parts) if parts else None
        piece["num_tokens"] = 0 if self.score_only else len(completion.token_ids)
        return piece

    def _usage(self, completion_tokens: int) -> dict[str, Any]:
        prompt_tokens = sum(len(p) for p in self.prompts)
        cached_tokens = sum(stream.num_cached_tokens for stream in self.streams)
        return usage_body(prompt_tokens, completion_tokens, cached_tokens)

    def _payload(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": self.state.system_fingerprint,
            "choices": choices,
        }

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        n = self.body.n
        num_completion_tokens = 0
        finished: set[int] = set()
        echoed: set[int] = set()
        async for position, output in merge_streams(self.streams):
            self._note_prompt_logprobs(position, output)
            for completion in output.outputs:
                index = position * n + completion.index
                if index in finished:
                    continue
                piece = self._piece(position, index, completion, first=index not in echoed)
                echoed.add(index)
                num_completion_tokens += piece.pop("num_tokens")
                if not piece["text"] and piece["logprobs"] is None and completion.finish_reason is None:
                    continue
                if completion.finish_reason is not None:
                    finished.add(index)
                payload = self._payload([{"index": index, **piece, "finish_reason": completion.finish_reason}])
                if include_usage:
                    payload["usage"] = None
                yield sse_event(payload)
        if include_usage:
            payload = self._payload([])
            payload["usage"] = self._usage(num_completion_tokens)
            yield sse_event(payload)
        yield SSE_DONE

    async def collect(self) -> CompletionResponse:
        num_choices = len(self.prompts) * self.body.n
        texts: list[list[str]] = [[] for _ in range(num_choices)]
        logprobs: list[list[dict[str, Any]] | None] = [None] * num_choices
        finish_reasons: list[str | None] = [None] * num_choices
        extras: list[dict[str, Any]] = [{} for _ in range(num_choices)]
        num_completion_tokens = 0
        async for position, output in merge_streams(self.streams):
            self._note_prompt_logprobs(position, output)
            for completion in output.outputs:
                index = position * self.body.n + completion.index
                piece = self._piece(position, index, completion, first=not texts[index])
                texts[index].append(piece.pop("text"))
                num_completion_tokens += piece.pop("num_tokens")
                part = piece.pop("logprobs")
                if part is not None:
                    logprobs[index] = logprobs[index] or []
                    logprobs[index].append(part)  # type: ignore[union-attr]
                extras[index].update(piece)
                if completion.finish_reason is not None:
                    finish_reasons[index] = completion.finish_reason
        choices = [
            {
                "index": i,
                "text": "".join(texts[i]),
                "logprobs": merge_completion_logprobs(logprobs[i]) if logprobs[i] is not None else None,
                "finish_reason": finish_reasons[i],
                **extras[i],
            }
            for i in range(num_choices)
        ]
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.body.model,
            choices=choices,  # type: ignore[arg-type]
            usage=self._usage(num_completion_tokens),  # type: ignore[arg-type]
            system_fingerprint=self.state.system_fingerprint,
        )
