"""A route whose JSON body is parsed and validated on a worker thread, not on the event loop.

FastAPI parses and validates a body on the event loop: a 4 MB body of 100,000 messages holds it
for over a second (JSON parsing, the input limits, pydantic), and every other request, /health
included, waits. This route class reads the body (asynchronously, so the size limit applies as it
streams), then does that work in a thread. The endpoint keeps its FastAPI signature, so
/openapi.json documents the body exactly as before.

Invariant: the endpoint takes `body` (a pydantic model) and `request` (a starlette Request), and
returns a Response or a pydantic model (sent as JSON, as FastAPI's response_model would).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, get_type_hints

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from api.errors import APIError


class ThreadedBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        model: type[BaseModel] = get_type_hints(self.endpoint)["body"]
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            raw = await request.body()
            body = await asyncio.to_thread(parse_body, model, raw)
            result = await endpoint(body=body, request=request)
            if isinstance(result, Response):
                return result
            return Response(result.model_dump_json(), media_type="application/json")

        return handler


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """The request model of a JSON body; a 400 (OpenAI-shaped, through the error handlers) otherwise."""
    try:
        data = json.loads(raw) if raw else None
    except RecursionError:
        raise APIError(400, "We could not parse the JSON body of your request: it is nested too deeply.") from None
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        raise APIError(400, f"We could not parse the JSON body of your request: {error}.") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None
