"""POST /v1/chat/completions: the OpenAI Chat Completions API, plain and streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.chat_template import render_chat_prompt
from api.errors import APIError, not_supported
from api.generation import (
    ClientDisconnected,
    EngineStream,
    cancel_on_disconnect,
    new_id,
    now_s,
    open_stream,
)
from api.logprobs import chat_logprobs
from api.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from api.sampling import build_sampling_params, check_stream_options
from api.state import ServerState, error_responses, get_state, stream_content
from api.streaming import SSE_DONE, SSEResponse, sse_event

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: stream_content(ChatCompletionChunk), **error_responses(400, 401, 404, 429, 500, 503)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    arrival_time = time.monotonic()
    state = get_state(request)
    state.check_model(body.model)
    check_unsupported(body)
    check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "Invalid value for 'top_logprobs': requires 'logprobs' to be true.", param="top_logprobs")
    params = build_sampling_params(
        body,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        vocab_size=state.vocab_size,
    )
    prompt_ids = render_chat_prompt(state.engine.tokenizer, body)
    try:
        stream = await cancel_on_disconnect(
            request,
            open_stream(
                state.engine,
                prompt_ids,
                params,
                metrics=state.metrics,
                admission=state.admission,
                arrival_time=arrival_time,
            ),
        )
    except ClientDisconnected:
        return Response(status_code=499)
    response_id, created = new_id("chatcmpl"), now_s()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = chat_events(state, stream, response_id, created, body.n, include_usage)
        return SSEResponse(events, on_close=stream.aclose)
    try:
        return await cancel_on_disconnect(request, collect_chat(state, stream, response_id, created, body.n))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await stream.aclose()


def check_unsupported(body: ChatCompletionRequest) -> None:
    """Tools and structured outputs are validated but not implemented yet: say so, never ignore."""
    if body.tool_choice is not None and not body.tools:
        raise APIError(
            400, "Invalid value for 'tool_choice': only allowed when 'tools' are given.", param="tool_choice"
        )
    # With tool_choice "none" the tools only inform the prompt and the answer is plain text, which
    # this server can do; any other choice needs tool-call parsing.
    if body.tools and body.tool_choice != "none":
        raise not_supported("tools", "Tool calling ('tools' with tool_choice other than 'none')")
    if body.response_format is not None and body.response_format.type != "text":
        raise not_supported("response_format", f"response_format of type '{body.response_format.type}'")


async def chat_events(
    state: ServerState, stream: EngineStream, response_id: str, created: int, n: int, include_usage: bool
) -> AsyncIterator[bytes]:
    model = state.model_name

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage  # OpenAI sends null in every chunk but the last
        return sse_event(payload)

    # The first chunk of each choice announces the role, as OpenAI's do; the response only started
    # once the engine accepted the request, so this is not a promise the engine may break.
    for index in range(n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])  # fmt: skip
    num_completion_tokens = 0
    finished: set[int] = set()
    async for output in stream:
        for completion in output.outputs:
            if completion.index in finished:
                continue
            num_completion_tokens += len(completion.token_ids)
            logprobs = None
            if completion.logprobs:
                logprobs = chat_logprobs(completion.logprobs, state.token_text)
            if not completion.text and logprobs is None and completion.finish_reason is None:
                continue  # tokens still held back by the detokenizer (a partial character, a stop prefix)
            if completion.finish_reason is not None:
                finished.add(completion.index)
            delta = {"content": completion.text} if completion.text else {}
            yield chunk(
                [{"index": completion.index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": completion.finish_reason}]
            )  # fmt: skip
    if include_usage:
        yield chunk([], usage=_usage(len(stream.prompt_token_ids), num_completion_tokens))
    yield SSE_DONE


async def collect_chat(
    state: ServerState, stream: EngineStream, response_id: str, created: int, n: int
) -> ChatCompletionResponse:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[Any] | None] = [None] * n  # None: the request asked for no logprobs
    finish_reasons: list[str | None] = [None] * n
    num_completion_tokens = 0
    async for output in stream:
        for completion in output.outputs:
            texts[completion.index].append(completion.text)
            num_completion_tokens += len(completion.token_ids)
            if completion.logprobs is not None:
                logprobs[completion.index] = logprobs[completion.index] or []
                logprobs[completion.index].extend(completion.logprobs)  # type: ignore[union-attr]
            if completion.finish_reason is not None:
                finish_reasons[completion.index] = completion.finish_reason
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": "".join(texts[i])},
            "logprobs": chat_logprobs(logprobs[i], state.token_text) if logprobs[i] is not None else None,
            "finish_reason": finish_reasons[i],
        }
        for i in range(n)
    ]
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=state.model_name,
        choices=choices,  # type: ignore[arg-type]
        usage=_usage(len(stream.prompt_token_ids), num_completion_tokens),  # type: ignore[arg-type]
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
