"""POST /v1/chat/completions: the OpenAI Chat Completions API, plain and streamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.chat_template import render_chat_prompt
from api.errors import APIError
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
from api.routing import ThreadedBodyRoute
from api.sampling import build_sampling_params, check_stream_options
from api.state import ServerState, error_responses, get_state, stream_content
from api.streaming import SSE_DONE, SSEResponse, sse_event
from api.structured import response_format_constraint
from api.tool_calls import ToolCallPlan, plan_tool_calls, tool_finish_reason

router = APIRouter(route_class=ThreadedBodyRoute)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: stream_content(ChatCompletionChunk), **error_responses(400, 401, 404, 429, 500, 503)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    arrival_time = time.monotonic()
    state = get_state(request)
    state.check_model(body.model)
    check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "Invalid value for 'top_logprobs': requires 'logprobs' to be true.", param="top_logprobs")
    content_constraint = response_format_constraint(body.response_format)
    tool_plan = await plan_tool_calls(body, state.tool_call_parser, content_constrained=content_constraint is not None)
    # A forced call leaves no room for content, so response_format (which shapes content) is moot then.
    constraint = tool_plan.constraint or content_constraint
    params = build_sampling_params(
        body,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        vocab_size=state.vocab_size,
        structured_outputs=constraint,
    )
    # The engine judges the constraint (compiling the schema) as 'structured_outputs'; the client
    # knows it by the parameter that set it.
    constraint_param = "tools" if tool_plan.forced else "response_format"
    # Rendering and tokenizing 100k messages takes seconds: off the event loop, which serves everyone.
    prompt_ids = await asyncio.to_thread(render_chat_prompt, state.engine.tokenizer, body)
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
                param_renames={"structured_outputs": constraint_param},
            ),
        )
    except ClientDisconnected:
        return Response(status_code=499)
    response_id, created = new_id("chatcmpl"), now_s()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = chat_events(state, stream, response_id, created, body.n, include_usage, tool_plan)
        return SSEResponse(events, on_close=stream.aclose)
    try:
        return await cancel_on_disconnect(request, collect_chat(state, stream, response_id, created, body.n, tool_plan))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await stream.aclose()


async def chat_events(
    state: ServerState,
    stream: EngineStream,
    response_id: str,
    created: int,
    n: int,
    include_usage: bool,
    tool_plan: ToolCallPlan,
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
    # once the engine accepted the request, so this is not a promise the engine may break. A forced
    # call has no content, and OpenAI's first chunk then says null.
    first_content = None if tool_plan.forced else ""
    for index in range(n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": first_content}, "logprobs": None,
                      "finish_reason": None}])  # fmt: skip
    readers = [tool_plan.stream_reader() for _ in range(n)]  # one tool-call parser per choice
    num_completion_tokens = 0
    finished: set[int] = set()
    async for output in stream:
        for completion in output.outputs:
            index = completion.index
            if index in finished:
                continue
            num_completion_tokens += len(completion.token_ids)
            logprobs = None
            if completion.logprobs:
                logprobs = chat_logprobs(completion.logprobs, state.token_text)
            finish_reason = completion.finish_reason
            reader = readers[index]
            if reader is None:
                deltas = [{"content": completion.text}] if completion.text else []
            else:
                deltas = reader.feed(completion.text, final=finish_reason is not None)
                finish_reason = tool_finish_reason(finish_reason, reader.has_calls)
            if not deltas and logprobs is None and finish_reason is None:
                continue  # text still held back (a partial character, a stop prefix, a tag prefix)
            if finish_reason is not None:
                finished.add(index)
            # One engine output may hold several deltas (content, then a call's start, then its
            # arguments); each goes in its own chunk, the logprobs in the first, the finish in the last.
            deltas = deltas or [{}]
            for position, delta in enumerate(deltas):
                last = position == len(deltas) - 1
                yield chunk(
                    [{"index": index, "delta": delta, "logprobs": logprobs if position == 0 else None,
                      "finish_reason": finish_reason if last else None}]
                )  # fmt: skip
    if include_usage:
        yield chunk([], usage=_usage(len(stream.prompt_token_ids), num_completion_tokens))
    yield SSE_DONE


async def collect_chat(
    state: ServerState, stream: EngineStream, response_id: str, created: int, n: int, tool_plan: ToolCallPlan
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
    choices = []
    for i in range(n):
        message, has_calls = tool_plan.message("".join(texts[i]))
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(logprobs[i], state.token_text) if logprobs[i] is not None else None,
                "finish_reason": tool_finish_reason(finish_reasons[i], has_calls),
            }
        )
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
