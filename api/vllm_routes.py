"""vLLM's routes beside the OpenAI API: POST /tokenize, POST /detokenize, GET /version, GET /ping.

Shapes as vLLM's: /tokenize takes a `prompt` (text, with the tokenizer's special tokens by default) or
chat `messages` (rendered through the chat template, as /v1/chat/completions would) and answers
`{count, max_model_len, tokens, token_strs}`; /detokenize takes `tokens` and answers `{prompt}`.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.chat_template import render_chat_prompt
from api.errors import APIError
from api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from api.state import error_responses, get_state, server_version

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 404))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    tokenizer = state.engine.tokenizer
    if isinstance(body, TokenizeChatRequest):
        if body.continue_final_message and body.add_generation_prompt:
            raise APIError(
                400,
                "Invalid value for 'continue_final_message': cannot be set together with 'add_generation_prompt'.",
                param="continue_final_message",
            )
        ids = await asyncio.to_thread(
            render_chat_prompt, tokenizer, body, state.options.chat_template, body.add_special_tokens
        )
    else:
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=state.max_model_len,
        tokens=ids,
        token_strs=tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 404))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    for position, token_id in enumerate(body.tokens):
        if token_id >= state.vocab_size:
            raise APIError(
                400,
                f"Invalid value for 'tokens': tokens[{position}] = {token_id} is outside the vocabulary "
                f"[0, {state.vocab_size})",
                param="tokens",
            )
    text = await asyncio.to_thread(state.engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": server_version()}


@router.get("/ping", responses={503: {"description": "The engine is not running, or the server is draining"}})
@router.post("/ping", include_in_schema=False)
async def ping(request: Request) -> Response:
    """vLLM's (and SageMaker's) liveness probe: /health's status, with an empty body."""
    state = get_state(request)
    healthy = not state.admission.draining and state.engine.is_alive
    return Response(status_code=200 if healthy else 503)
