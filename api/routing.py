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
import time
from collections.abc import Awaitable, Callable
from typing import Any, get_type_hints

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from api.errors import APIError
from api.input_limits import check_request_tree
from api.protocol import ChatCompletionRequest


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
        return model.model_validate(_with_long_lists_validated(model, data))
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def _with_long_lists_validated(model: type[BaseModel], data: Any) -> Any:
    """`data` with its long lists of models (100k messages) validated slice by slice.

    pydantic validates a body in one call that holds the GIL throughout (a second for 100k
    messages), so even on a worker thread it would stall the event loop; between slices the GIL
    is released. The model then takes the validated items as they are (pydantic does not
    revalidate model instances). The input limits run first, as they would in one call.
    """
    if not isinstance(data, dict):
        return data
    long_lists = [name for name in _MODEL_LISTS.get(model, ()) if isinstance(data.get(name), list)]
    long_lists = [name for name in long_lists if len(data[name]) > _SLICE]
    if not long_lists:
        return data
    check_request_tree(data)
    data = dict(data)
    for name in long_lists:
        adapter = TypeAdapter(model.model_fields[name].annotation)
        items, validated = data[name], []
        for start in range(0, len(items), _SLICE):
            try:
                validated += adapter.validate_python(items[start : start + _SLICE])
            except ValidationError as error:
                errors = error.errors(include_url=False)
                for entry in errors:  # locations relative to the slice -> to the body
                    index, *rest = entry["loc"]
                    entry["loc"] = (name, start + index, *rest)
                raise RequestValidationError(errors) from None
            time.sleep(0)  # lets the event loop's thread take the GIL
        data[name] = validated
    return data


_SLICE = 1000
_MODEL_LISTS = {ChatCompletionRequest: ("messages",)}
