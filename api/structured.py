"""`response_format` -> the engine's output constraint (JSON mode and JSON schema).

The constraint is enforced by grammar-constrained decoding in the engine, so the output is valid by
construction whatever the model; the schema itself is compiled (and judged) when the engine accepts
the request, which `api.generation.open_stream` turns into a 400 naming `response_format`.
"""

from __future__ import annotations

from api.errors import APIError
from api.protocol import ResponseFormat
from engine.structured_outputs import StructuredOutputsParams

RESPONSE_FORMAT = "response_format"


def response_format_constraint(response_format: ResponseFormat | None) -> StructuredOutputsParams | None:
    """The constraint a response_format asks for; None for plain text. A 400 APIError if malformed."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    schema = response_format.json_schema.json_schema
    if schema is None:
        # OpenAI lists `schema` as optional, but a json_schema format without one constrains nothing;
        # a silent fallback to free text would break the client's parsing later, so say it here.
        raise APIError(
            400,
            "Missing required parameter: 'response_format.json_schema.schema' (the JSON schema the output "
            "must follow; use {'type': 'json_object'} for any JSON object).",
            param="response_format.json_schema.schema",
        )
    # `strict` needs no handling: the constraint always holds the output to the whole schema.
    return StructuredOutputsParams(json=schema)
