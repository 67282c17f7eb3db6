"""What every handler needs from the server: the engine, metrics, admission, the served name."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from api.admission import Admission
from api.errors import APIError
from api.logprobs import TokenText
from api.metrics import ServerMetrics
from api.protocol import ErrorResponse
from api.tool_parsers import ToolCallParser, get_tool_parser, parser_for_template


class ServerState:
    def __init__(
        self, engine: Any, *, max_waiting_requests: int | None = None, tool_call_parser: str | None = None
    ) -> None:
        if engine.tokenizer is None:
            # Chat templates, text prompts, stop strings and logprob tokens all need it.
            raise ValueError(
                "The OpenAI server needs the model's tokenizer; start the engine without skip_tokenizer_init"
            )
        self.engine = engine
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        # Token ids a client may name (logit_bias, stop_token_ids): the engine's vocabulary when it
        # says, else the tokenizer's, which never exceeds the model's embedding table.
        self.vocab_size: int = getattr(engine, "vocab_size", None) or len(engine.tokenizer)
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine)
        self.admission = Admission(engine, max_waiting_requests)
        self.token_text = TokenText(engine.tokenizer)
        # The format tool_choice "auto" reads calls in: the one named, else the one the chat template
        # teaches the model; None (no known format) leaves "auto" answers as content.
        parser_name = tool_call_parser or parser_for_template(getattr(engine.tokenizer, "chat_template", None))
        self.tool_call_parser: ToolCallParser | None = get_tool_parser(parser_name) if parser_name else None

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.sluice


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer, all with the OpenAI error body."""
    return {code: {"model": ErrorResponse, "description": "OpenAI-shaped error"} for code in status_codes}


def stream_content(chunk_model: type[BaseModel]) -> dict[str, Any]:
    """Documents that a 200 may also be an event stream (when the request sets `stream`)."""
    return {
        "description": "The completion, or with `stream: true` an event stream of chunks shaped like "
        f"{chunk_model.__name__}, ended by `data: [DONE]`.",
        # Tools that validate streams (schemathesis) check each server-sent event against this schema.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string"},
                        "data": {"type": "string", "description": "a JSON chunk, or [DONE]"},
                    },
                    "required": ["data"],
                }
            }
        },
    }
