"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

FastAPI's defaults (422 with a list of pydantic errors, `{"detail": ...}` bodies, a bare 500) break
OpenAI clients, which read `error.message`; these handlers replace all of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# The `type` values of the protocol's discriminated unions (content parts, response_format).
_UNION_TAGS = frozenset(
    {"text", "image_url", "input_audio", "file", "refusal", "json_object", "json_schema"}
    | {"system", "developer", "user", "assistant", "tool"}
)
_PARAM_IN_MESSAGE = re.compile(r"Invalid value for '([^']+)'")


class APIError(Exception):
    """An error a client caused (or may retry), answered with its status and an OpenAI body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # A message or param may quote the client's input, lone surrogates included; the body must
        # still encode as UTF-8 (else the error itself becomes a 500).
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request_from_value_error(
    error: ValueError, default_param: str | None = None, renames: Mapping[str, str] | None = None
) -> APIError:
    """A 400 from the engine's or SamplingParams' ValueError, keeping the parameter it names.

    `renames` maps engine parameter names to the request's own: the engine judges a constraint as
    'structured_outputs', which the client set as 'response_format' (or through its tools).
    """
    message = str(error)
    if "maximum context length" in message:
        return APIError(400, message, param=default_param, code="context_length_exceeded")
    match = _PARAM_IN_MESSAGE.search(message)
    if match is None:
        return APIError(400, message, param=default_param)
    param = match.group(1)
    if renames and param in renames:
        param = renames[param]
        message = message[: match.start(1)] + param + message[match.end(1) :]
    return APIError(400, message, param=param)


def not_supported(param: str, what: str) -> APIError:
    """A 400 for a feature that is parsed but not implemented, so it is never silently ignored."""
    return APIError(400, f"{what} is not supported by this server yet.", param=param, code="unsupported_parameter")


def _clean_loc(loc: Sequence[Any]) -> list[str | int]:
    """The client's field path of a pydantic error location, without pydantic's additions."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    cleaned: list[str | int] = []
    dropped_tag = False
    for part in parts:
        if isinstance(part, str) and _is_union_member(part):
            continue
        # In a discriminated union pydantic inserts the tag ("text" of a content part); it sits
        # right after a list index or after `response_format`, where no field name can.
        after_union = bool(cleaned) and (isinstance(cleaned[-1], int) or cleaned[-1] == "response_format")
        if part in _UNION_TAGS and after_union and not dropped_tag:
            dropped_tag = True
            continue
        dropped_tag = False
        cleaned.append(part)
    return cleaned


def _is_union_member(part: str) -> bool:
    # pydantic names the union member that failed ("str", "list[str]", "NamedToolChoice",
    # "literal['none','auto']") as if it were a field; our field names are all snake_case.
    return "[" in part or part in ("str", "int", "float", "bool", "none") or part[:1].isupper()


def param_path(parts: Sequence[str | int]) -> str | None:
    """`["messages", 0, "content"]` -> `"messages[0].content"`: OpenAI's param notation."""
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"We could not parse the JSON body of your request: {detail}.")
    locs = [_clean_loc(e.get("loc", ())) for e in errors]
    if not locs[0]:
        return APIError(400, "The request body must be a JSON object (sent as Content-Type: application/json).")
    # A union (`stop: str | list[str]`) fails once per member, all about the same parameter. The
    # deepest of those errors is the most specific (a bad part inside a content list); at equal
    # depth, the members' complaints are joined: "a valid string or a valid list".
    related = [(loc, e) for loc, e in zip(locs, errors) if loc[: len(locs[0])] == locs[0]]
    depth = max(len(loc) for loc, _ in related)
    deepest = [(loc, e) for loc, e in related if len(loc) == depth]
    loc = deepest[0][0]
    if deepest[0][1].get("type") == "union_tag_invalid":
        # The bad value is the discriminator field itself (a message's `role`, a part's `type`).
        loc = [*loc, str((deepest[0][1].get("ctx") or {}).get("discriminator", "")).strip("'")]
    param = param_path(loc)
    if all(e.get("type") == "missing" for _, e in deepest):
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    messages: list[str] = []
    for _, e in deepest:
        msg = str(e.get("msg", "invalid value"))
        if messages and msg.startswith("Input should be "):
            msg = msg[len("Input should be ") :]
        if msg not in messages:
            messages.append(msg)
    return APIError(400, f"Invalid value for '{param}': {' or '.join(messages)}", param=param)


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_to_api_error(exc).response()


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    if exc.status_code == 400 and "parsing the body" in message:  # FastAPI's words for an undecodable body
        message = "We could not parse the JSON body of your request."
    if exc.status_code == 404:
        message = f"Unknown path: {request.method} {request.url.path}"
    code = "request_too_large" if exc.status_code == 413 else None
    return APIError(exc.status_code, message, code=code, headers=exc.headers).response()


class UnexpectedErrorMiddleware:
    """Answers any exception that escapes a handler with a 500 carrying no internals.

    Starlette's own catch-all (an `Exception` handler) re-raises after responding, and uvicorn
    then drops the connection, so a client's pooled keep-alive connection fails on its next request;
    handling it here keeps the connection usable.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            # The traceback goes to the log, never to the client: it may reveal paths and internals.
            logger.exception("Unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if response_started:
                raise  # too late for a 500; the server closes the connection
            error = APIError(500, "The server had an error while processing your request.", code="internal_error")
            await error.response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    # Added before any other middleware, so it sits innermost, right around the routes.
    app.add_middleware(UnexpectedErrorMiddleware)
