"""Forced tool calls: the constraint that makes a model's output tool calls in its family's format.

With tool_choice "required" or a named function, the output must be calls of the allowed tools,
with JSON arguments valid against each tool's parameters, in the format the model was trained on
and its parser reads back:

    hermes (Qwen, Hermes):   <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
                             several separated by a newline
    llama3_json (Llama 3.1+): {"name": "f", "parameters": {...}}
                             several separated by "; "

once (always, for a named function), or several when tool_choice is "required" and parallel calls
are allowed. The constraint is an EBNF grammar (xgrammar's dialect) for
`StructuredOutputsParams(grammar=...)`; the JSON-schema parts are converted by xgrammar, so building
it needs xgrammar, like running it does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from engine.sampling.structured_outputs import (
    StructuredOutputsParams,
    import_xgrammar,
    json_schema_grammar,
    xgrammar_message,
)

# OpenAI: a function without `parameters` takes none, so its arguments are exactly {}.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


# How each format writes one call around its arguments, and what separates calls.
CALL_FORMATS: dict[str, tuple[str, str, str]] = {
    "hermes": ('<tool_call>\n{{"name": {name}, "arguments": ', "}\n</tool_call>", "\n"),
    "llama3_json": ('{{"name": {name}, "parameters": ', "}", "; "),
}


def forced_tool_call_constraint(
    tools: Sequence[Mapping[str, Any] | Any],
    tool_choice: str | Mapping[str, Any] | Any,
    parallel_tool_calls: bool = True,
    call_format: str = "hermes",
) -> StructuredOutputsParams:
    """The constraint for tool_choice "required" (any of `tools`) or a named function (that one).

    `tools` are OpenAI function tools (dicts, or pydantic models of them); with "required",
    `parallel_tool_calls` allows one or more calls instead of exactly one. A named function is called
    exactly once, as OpenAI and vLLM do. Raises ValueError naming 'tools' or 'tool_choice'.
    """
    functions = [_function_of(tool, i) for i, tool in enumerate(tools)]
    if not functions:
        raise ValueError("Invalid value for 'tools': tool_choice needs at least one tool to call")
    choice = _as_dict(tool_choice)
    chosen = _chosen_functions(functions, choice)
    key = json.dumps([[f["name"], f.get("parameters")] for f in chosen], ensure_ascii=False)
    parallel = bool(parallel_tool_calls) and choice == "required"
    return StructuredOutputsParams(grammar=_grammar(key, parallel, call_format))


@functools.lru_cache(maxsize=64)
def _grammar(functions_json: str, parallel: bool, call_format: str) -> str:
    """EBNF of one (or one-or-more) tool calls; cached, as clients resend the same tools."""
    xgr = import_xgrammar()
    grammar_cls = xgr.Grammar
    head_template, tail, separator = CALL_FORMATS[call_format]
    calls = []
    for name, parameters in json.loads(functions_json):
        head = head_template.format(name=json.dumps(name, ensure_ascii=False))
        try:
            arguments = grammar_cls.from_ebnf(json_schema_grammar(parameters or _NO_PARAMETERS))
        except RuntimeError as error:
            raise ValueError(
                f"Invalid value for 'tools': the parameters of function {name!r} are not a valid JSON "
                f"schema: {xgrammar_message(error)}"
            ) from None
        calls.append(grammar_cls.concat(_literal(grammar_cls, head), arguments, _literal(grammar_cls, tail)))
    one_call = calls[0] if len(calls) == 1 else grammar_cls.union(*calls)
    if not parallel:
        return str(one_call)
    # A new start rule repeating the old one; xgrammar renames the old `root` when it reads this back.
    repeated = grammar_cls.from_ebnf(
        f"{one_call}\ntool_calls ::= root ({json.dumps(separator)} root)*\n", root_rule_name="tool_calls"
    )
    return str(repeated)


def _literal(grammar_cls: Any, text: str) -> Any:
    # A JSON string literal is a valid EBNF string literal for xgrammar (same escapes).
    return grammar_cls.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")


def _chosen_functions(functions: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]]:
    if tool_choice == "required":
        return functions
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = _as_dict(tool_choice.get("function") or {}).get("name")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise ValueError(
                f"Invalid value for 'tool_choice': function {name!r} is not among the tools "
                f"({', '.join(f['name'] for f in functions)})"
            )
        return chosen[:1]
    raise ValueError(
        "Invalid value for 'tool_choice': a forced tool call needs 'required' or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}'
    )


def _function_of(tool: Any, index: int) -> dict[str, Any]:
    tool = _as_dict(tool)
    function = _as_dict(tool.get("function"))
    if tool.get("type", "function") != "function" or not isinstance(function.get("name"), str):
        raise ValueError(f"Invalid value for 'tools': tools[{index}] is not a function tool with a name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ValueError(f"Invalid value for 'tools': tools[{index}].function.parameters must be an object")
    return {"name": function["name"], "parameters": parameters}


def _as_dict(value: Any) -> Any:
    """Dicts as they are; pydantic models (the API's request types) as their dicts."""
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return value if value is not None else {}
