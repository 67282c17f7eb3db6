"""The FastAPI application: OpenAI routes, health, metrics, errors, auth, and engine shutdown."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api import chat, completions, models, vllm_routes
from api.auth import PROTECTED_PREFIX, APIKeyMiddleware, route_path
from api.body_limit import DEFAULT_MAX_REQUEST_BODY_BYTES, BodySizeLimitMiddleware
from api.errors import APIError, install_error_handlers
from api.options import ServerOptions
from api.state import ServerState, get_state
from api.streaming import engine_gone_message
from engine.async_llm import EngineDeadError

logger = logging.getLogger(__name__)


def create_app(
    engine: Any,
    *,
    api_key: str | None = None,
    max_waiting_requests: int | None = None,
    shutdown_engine: bool = True,
    tool_call_parser: str | None = None,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
    options: ServerOptions | None = None,
) -> FastAPI:
    """An app serving `engine` (an AsyncLLM). With `shutdown_engine`, stopping the app stops it.

    `tool_call_parser` names the tool-call format of tool_choice "auto" (default: the chat template's);
    `options` holds the settings vLLM users pass (served-name aliases, chat template, CORS, ...).
    """
    options = options or ServerOptions()
    state = ServerState(
        engine, max_waiting_requests=max_waiting_requests, tool_call_parser=tool_call_parser, options=options
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has already waited for in-flight requests (bounded by its graceful-shutdown
        # timeout); whatever is left is aborted when the engine loop stops.
        state.admission.start_draining()
        if shutdown_engine:
            await engine.shutdown()

    app = FastAPI(
        title="sluicegate",
        summary="OpenAI-compatible LLM inference server",
        lifespan=lifespan,
    )
    # The prefix a proxy strips (--root-path): FastAPI sets it as the ASGI root_path of every request,
    # so routes still match and /docs and openapi.json name the public URL. (As an attribute: the
    # constructor's parameter is deprecated.)
    app.root_path = options.root_path
    app.state.sluice = state
    install_error_handlers(app)
    app.add_exception_handler(EngineDeadError, _engine_dead_handler)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(models.router)
    app.include_router(vllm_routes.router)

    @app.get(
        "/health",
        responses={503: {"description": "The engine loop is not running, or the server is draining"}},
    )
    async def health(request: Request) -> Response:
        current = get_state(request)
        if current.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not current.engine.is_alive:
            status = "engine restarting" if getattr(current.engine, "is_restarting", False) else "engine not running"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics(request: Request) -> Response:
        body, content_type = get_state(request).metrics.render()
        return Response(body, media_type=content_type)

    # Middleware added later runs earlier: drain (503), then auth (401), then the body's size (413),
    # so an unauthenticated client learns nothing, and no body is read for a refused request.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(DrainMiddleware, state=state)
    # Outermost: a browser's preflight is answered before auth (it carries no key), and every answer,
    # errors included, carries the CORS headers the browser needs to read it.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(options.allowed_origins),
        allow_methods=list(options.allowed_methods),
        allow_headers=list(options.allowed_headers),
        allow_credentials=options.allow_credentials,
    )
    return app


async def _engine_dead_handler(request: Request, exc: Exception) -> Response:
    """A request the engine could not finish (it died, or the server stopped it at its shutdown
    timeout) is a 503 the client may retry, not a 500."""
    assert isinstance(exc, EngineDeadError)
    message, code = engine_gone_message(exc)
    return APIError(503, message, code=code).response()


def start_draining(app: FastAPI) -> None:
    """New /v1 requests get 503 from now on; the ones in flight carry on."""
    app.state.sluice.admission.start_draining()


class DrainMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.state.admission.draining and route_path(scope).startswith(PROTECTED_PREFIX):
            error = APIError(503, "The server is shutting down and accepts no new requests.", code="shutting_down")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
