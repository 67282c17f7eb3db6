"""Server-Sent Events as OpenAI streams them: `data: {json}\\n\\n` per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import error_body
from engine.async_llm import EngineDeadError, EngineStoppedError

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Tells nginx-style proxies not to buffer: a buffered stream is no stream.
    "X-Accel-Buffering": "no",
}


# Line breaks to Python's str.splitlines (and so to httpx's aiter_lines) that JSON leaves raw. SSE
# itself splits only on CR and LF, but a client that reads events line by line that way would cut
# an event in two, so they go out as JSON escapes, which decode to the same text.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: dict[str, Any]) -> bytes:
    # Compact separators keep per-token events small; ensure_ascii=False keeps them readable.
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS_JSON_KEEPS)
    return b"data: " + data.encode() + b"\n\n"


def sse_error(message: str, code: str | None = None) -> bytes:
    """An error after the 200 went out: the only way left to tell the client is an event."""
    return sse_event(error_body(message, "server_error", None, code))


async def guarded_events(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Passes events through; a failure becomes an error event, then [DONE], so a client always
    sees the stream end properly (never a body cut mid-way)."""
    try:
        async for event in events:
            yield event
    except EngineDeadError as error:  # the engine died, or the server's shutdown timeout ran out
        logger.warning("Stream ended early: %s", error)
        message, code = engine_gone_message(error)
        yield sse_error(message, code)
        yield SSE_DONE
    except Exception:
        logger.exception("Error while streaming a response")
        yield sse_error("The server had an error while processing your request.", "internal_error")
        yield SSE_DONE


def engine_gone_message(error: EngineDeadError) -> tuple[str, str]:
    """The client-facing (message, code) of a request the engine could not finish (a 503)."""
    if isinstance(error, EngineStoppedError):
        return "The server is shutting down; the request was stopped before it finished.", "shutting_down"
    return "The inference engine failed and is being restarted; retry the request.", "engine_dead"


class SSEResponse(StreamingResponse):
    """A streaming response that always runs `on_close`, however the stream ends.

    When the client disconnects, Starlette cancels the send loop while the body iterator may sit at
    a `yield`, where no exception reaches it; `on_close` (closing the engine streams, which aborts
    them) then runs here, shielded from that cancellation.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(guarded_events(events), headers=SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._events.aclose()  # type: ignore[attr-defined]
                await self._on_close()
