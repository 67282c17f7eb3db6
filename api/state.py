"""What every handler needs from the server: the engine, metrics, admission, the served name."""

from __future__ import annotations

import hashlib
import logging
import time
from importlib import metadata
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from api.admission import Admission
from api.errors import APIError
from api.logprobs import TokenText
from api.metrics import ServerMetrics
from api.options import ServerOptions
from api.protocol import ErrorResponse
from api.reasoning import ReasoningParser, get_reasoning_parser, parser_name_for_template
from api.tool_parsers import ToolCallParser, get_tool_parser, parser_for_template

logger = logging.getLogger(__name__)


class ServerState:
    def __init__(
        self,
        engine: Any,
        *,
        max_waiting_requests: int | None = None,
        tool_call_parser: str | None = None,
        options: ServerOptions | None = None,
    ) -> None:
        if engine.tokenizer is None:
            # Chat templates, text prompts, stop strings and logprob tokens all need it.
            raise ValueError(
                "The OpenAI server needs the model's tokenizer; start the engine without skip_tokenizer_init"
            )
        self.engine = engine
        self.options = options = options or ServerOptions()
        self.model_name: str = engine.model_name
        # Every name a client may pass as `model`; the first is the one responses carry.
        self.model_names: tuple[str, ...] = tuple(dict.fromkeys((self.model_name, *options.served_model_aliases)))
        # The template chat requests render with unless they bring their own (None: the tokenizer's).
        self.chat_template: str | None = options.chat_template or getattr(engine.tokenizer, "chat_template", None)
        self.max_model_len: int = engine.max_model_len
        # Token ids a client may name (logit_bias, stop_token_ids): the engine's vocabulary when it
        # says, else the tokenizer's, which never exceeds the model's embedding table.
        self.vocab_size: int = getattr(engine, "vocab_size", None) or len(engine.tokenizer)
        self.created = int(time.time())
        # OpenAI's system_fingerprint: changes when the server's build or model does.
        build = f"{server_version()}:{self.model_name}"
        self.system_fingerprint = "fp_" + hashlib.sha256(build.encode()).hexdigest()[:10]
        self.metrics = ServerMetrics(engine, model_name=self.model_name)
        self.admission = Admission(engine, max_waiting_requests)
        self.token_text = TokenText(engine.tokenizer)
        # The format tool_choice "auto" reads calls in: the one named, else the one the chat template
        # teaches the model; None (no known format) leaves "auto" answers as content.
        parser_name = tool_call_parser or parser_for_template(self.chat_template)
        self.tool_call_parser: ToolCallParser | None = get_tool_parser(parser_name) if parser_name else None
        self.reasoning_parser: ReasoningParser | None = _reasoning_parser(
            options.reasoning_parser, self.chat_template, engine.tokenizer
        )

    def check_model(self, model: str | None) -> None:
        """A 404 unless `model` is one of the served names (None: a vLLM route where it is optional)."""
        if model is not None and model not in self.model_names:
            served = "', '".join(self.model_names)
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{served}'.",
                param="model",
                code="model_not_found",
            )


def _reasoning_parser(name: str | None, chat_template: str | None, tokenizer: Any) -> ReasoningParser | None:
    """The parser named (a ValueError if this tokenizer cannot have it), else the template's if it has one."""
    if name is not None:
        return get_reasoning_parser(name, tokenizer)
    detected = parser_name_for_template(chat_template)
    if detected is None:
        return None
    try:
        return get_reasoning_parser(detected, tokenizer)
    except ValueError as error:
        logger.warning("The chat template looks like %s's, but no reasoning parser runs: %s", detected, error)
        return None


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens the prefix cache served."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def server_version() -> str:
    """The installed sluicegate version (GET /version)."""
    try:
        return metadata.version("sluicegate")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


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
