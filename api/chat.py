"""POST /v1/chat/completions: the OpenAI Chat Completions API, plain and streamed."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
from api.logprobs import chat_logprobs, vllm_prompt_logprobs
from api.protocol import AssistantMessage, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from api.reasoning import Phase, ReasoningParser
from api.routing import ThreadedBodyRoute
from api.sampling import build_sampling_params, check_max_logprobs, check_stream_options, truncate_prompt
from api.state import ServerState, error_responses, get_state, stream_content, usage_body
from api.streaming import SSE_DONE, SSEResponse, sse_event
from api.structured import request_constraint
from api.tool_calls import ToolCallPlan, plan_tool_calls, tool_finish_reason

logger = logging.getLogger(__name__)
router = APIRouter(route_class=ThreadedBodyRoute)


@dataclasses.dataclass(frozen=True)
class AnswerShape:
    """What shapes a chat answer besides its tool calls: vLLM's additions to the OpenAI answer."""

    model: str | None = None  # the served name the client used (None: the server's first name)
    reasoning: ReasoningParser | None = None  # splits thinking from the answer; None: all content
    reasoning_phase: Phase = Phase.ANSWER  # where the output starts
    echo: str = ""  # vLLM's chat echo: the last (assistant) message's content, before the answer


PLAIN_ANSWER = AnswerShape()


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
    check_max_logprobs("top_logprobs", body.top_logprobs, state.options.max_logprobs)
    check_max_logprobs("prompt_logprobs", body.prompt_logprobs, state.options.max_logprobs)
    if body.prompt_logprobs is not None and body.stream:
        raise not_supported("prompt_logprobs", "'prompt_logprobs' with 'stream'")
    content_constraint, content_param = request_constraint(body)
    tool_plan = await plan_tool_calls(body, state.tool_call_parser, content_constrained=content_constraint is not None)
    # A forced call leaves no room for content, so response_format (which shapes content) is moot then.
    constraint = tool_plan.constraint or content_constraint
    # Rendering and tokenizing 100k messages takes seconds: off the event loop, which serves everyone.
    prompt_ids = await asyncio.to_thread(render_chat_prompt, state.engine.tokenizer, body, state.options.chat_template)
    prompt_ids = truncate_prompt(prompt_ids, body.truncate_prompt_tokens, state.max_model_len)
    reasoning = state.reasoning_parser
    phase = reasoning.initial_phase(prompt_ids) if reasoning is not None else Phase.ANSWER
    if constraint is not None and reasoning is not None:
        # The thinking is free text; the constraint holds for the answer after it.
        constraint = dataclasses.replace(constraint, thinking=reasoning.thinking_markers(phase))
    params = build_sampling_params(
        body,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        vocab_size=state.vocab_size,
        structured_outputs=constraint,
        tokenizer=state.engine.tokenizer,
        defaults=state.options.sampling_defaults,
        prompt_logprobs=body.prompt_logprobs,
    )
    # The engine judges the constraint (compiling the schema) as 'structured_outputs'; the client
    # knows it by the parameter that set it.
    constraint_param = "tools" if tool_plan.forced else content_param
    response_id, created = new_id("chatcmpl"), now_s()
    if state.options.log_requests:
        logger.info("Received request %s: %d prompt tokens, params: %s", response_id, len(prompt_ids), params)
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
    shape = AnswerShape(body.model, reasoning, phase, _echo_text(body))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = chat_events(state, stream, response_id, created, body.n, include_usage, tool_plan, shape)
        return SSEResponse(events, on_close=stream.aclose)
    try:
        return await cancel_on_disconnect(
            request, collect_chat(state, stream, response_id, created, body.n, tool_plan, shape)
        )
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await stream.aclose()


def _echo_text(body: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's content when that message is the assistant's (the answer
    then reads as its continuation), else nothing."""
    last = body.messages[-1]
    if not body.echo or not isinstance(last, AssistantMessage) or last.content is None:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text for part in last.content if part.type == "text")


async def chat_events(
    state: ServerState,
    stream: EngineStream,
    response_id: str,
    created: int,
    n: int,
    include_usage: bool,
    tool_plan: ToolCallPlan,
    shape: AnswerShape = PLAIN_ANSWER,
) -> AsyncIterator[bytes]:
    model = shape.model or state.model_name

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": state.system_fingerprint,
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
        if shape.echo:
            yield chunk([{"index": index, "delta": {"content": shape.echo}, "logprobs": None, "finish_reason": None}])
    readers = [tool_plan.stream_reader() for _ in range(n)]  # one tool-call parser per choice
    reasoning = shape.reasoning
    splitters = [reasoning.splitter(shape.reasoning_phase) if reasoning else None for _ in range(n)]
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
            final = finish_reason is not None
            deltas: list[dict[str, Any]] = []
            text = completion.text
            splitter = splitters[index]
            if splitter is not None:
                thought, text = splitter.feed(text, final=final)
                if thought:
                    deltas.append({"reasoning_content": thought, "reasoning": thought})
            reader = readers[index]
            if reader is None:
                if text:
                    deltas.append({"content": text})
            else:
                deltas += reader.feed(text, final=final)
                finish_reason = tool_finish_reason(finish_reason, reader.has_calls)
            if not deltas and logprobs is None and finish_reason is None:
                continue  # text still held back (a partial character, a stop prefix, a tag prefix)
            if finish_reason is not None:
                finished.add(index)
            # One engine output may hold several deltas (thinking, content, then a call's start, then
            # its arguments); each goes in its own chunk, the logprobs in the first, the finish in the last.
            deltas = deltas or [{}]
            for position, delta in enumerate(deltas):
                last = position == len(deltas) - 1
                yield chunk(
                    [{"index": index, "delta": delta, "logprobs": logprobs if position == 0 else None,
                      "finish_reason": finish_reason if last else None}]
                )  # fmt: skip
    if include_usage:
        usage = usage_body(len(stream.prompt_token_ids), num_completion_tokens, stream.num_cached_tokens)
        yield chunk([], usage=usage)
    yield SSE_DONE


async def collect_chat(
    state: ServerState,
    stream: EngineStream,
    response_id: str,
    created: int,
    n: int,
    tool_plan: ToolCallPlan,
    shape: AnswerShape = PLAIN_ANSWER,
) -> ChatCompletionResponse:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[Any] | None] = [None] * n  # None: the request asked for no logprobs
    finish_reasons: list[str | None] = [None] * n
    num_completion_tokens = 0
    prompt_logprobs = None
    async for output in stream:
        if output.prompt_logprobs is not None:
            prompt_logprobs = vllm_prompt_logprobs(output.prompt_logprobs, state.token_text)
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
        text, thought = "".join(texts[i]), None
        if shape.reasoning is not None:
            splitter = shape.reasoning.splitter(shape.reasoning_phase)
            thought, text = splitter.feed(text, final=True)
            thought = thought if splitter.saw_reasoning else None
        message, has_calls = tool_plan.message(text)
        if thought is not None:
            message["reasoning_content"] = message["reasoning"] = thought
        if shape.echo:
            message["content"] = shape.echo + (message["content"] or "")
        elif shape.reasoning is not None and not message["content"]:
            message["content"] = None  # vLLM: an answer that is all thinking has null content
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
        model=shape.model or state.model_name,
        choices=choices,  # type: ignore[arg-type]
        usage=usage_body(len(stream.prompt_token_ids), num_completion_tokens, stream.num_cached_tokens),  # type: ignore[arg-type]
        system_fingerprint=state.system_fingerprint,
        prompt_logprobs=prompt_logprobs,
    )
