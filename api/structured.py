"""`response_format` (JSON mode and JSON schema) and vLLM's structured-output fields -> the engine's
output constraint.

The constraint is enforced by grammar-constrained decoding in the engine, so the output is valid by
construction whatever the model; the schema itself is compiled (and judged) when the engine accepts
the request, which `api.generation.open_stream` turns into a 400 naming `response_format`.
"""

from __future__ import annotations

from api.errors import APIError, bad_request_from_value_error
from api.protocol import ResponseFormat, SamplingFields
from engine.sampling.structured_outputs import StructuredOutputsParams

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


# vLLM's older request fields for the constraints `structured_outputs` now holds, and the kind each sets.
_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def request_constraint(request: SamplingFields) -> tuple[StructuredOutputsParams | None, str]:
    """The output constraint a chat or completion request asks for, and the parameter that asked.

    OpenAI's `response_format`, vLLM's `structured_outputs` (json, regex, choice, grammar, json_object)
    or one of vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`: at most
    one of them, or a 400 naming them.
    """
    given = [
        name
        for name in ("response_format", "structured_outputs", *_GUIDED_FIELDS)
        if getattr(request, name) is not None
        and not (name == "response_format" and request.response_format.type == "text")
    ]
    if len(given) > 1:
        raise APIError(
            400,
            f"Invalid value for '{given[1]}': set only one of {', '.join(repr(g) for g in given)} "
            "(each constrains the whole output).",
            param=given[1],
        )
    if not given:
        return None, RESPONSE_FORMAT
    param = given[0]
    if param == RESPONSE_FORMAT:
        return response_format_constraint(request.response_format), param
    if param == "structured_outputs":
        fields = request.structured_outputs
        kinds = {
            "json": fields.json_,
            "regex": fields.regex,
            "choice": fields.choice,
            "grammar": fields.grammar,
            "json_object": bool(fields.json_object),
        }
    else:
        kinds = {_GUIDED_FIELDS[param]: getattr(request, param)}
    try:
        return StructuredOutputsParams(**kinds), param
    except ValueError as error:
        raise bad_request_from_value_error(error, renames={"structured_outputs": param}) from None
