"""Refuses request bodies over a size limit with 413, without reading them whole.

A declared Content-Length over the limit is answered at once, before a byte of the body is read.
A chunked body (no Content-Length) is counted as it streams in, and refused as soon as the count
passes the limit, so the server never holds more than the limit of one request's body in memory.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError

# vLLM sets no limit of its own on a body (uvicorn's h11 caps only headers). 32 MiB is 8 million
# tokens of text, or a 1,024-prompt batch of 4,000 tokens each as token ids: far beyond any context
# length served today, and small enough that a handful of such bodies cannot exhaust memory.
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024


def _too_large_message(limit: int) -> str:
    return f"The request body is larger than this server's limit of {limit} bytes (--max-request-body-bytes)."


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"Invalid value for 'max_request_body_bytes': must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            # Answered without reading the body; closing the connection spares uvicorn from
            # reading (and discarding) the rest of it to keep the connection alive.
            error = APIError(
                413, _too_large_message(self.max_bytes), code="request_too_large", headers={"Connection": "close"}
            )
            await error.response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised where the route reads its body; FastAPI passes HTTPExceptions through
                    # to the error handlers, which answer it in the OpenAI shape.
                    raise HTTPException(413, _too_large_message(self.max_bytes), headers={"Connection": "close"})
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn refuses a malformed Content-Length before the app sees it
    return None
