"""Limits on what a request body may contain, checked before anything else looks at it.

Python's recursion limit (1,000 frames) is reached by a JSON value nested a few hundred levels
deep while it is pickled for the engine process, rendered by a chat template, or compiled into a
grammar, and that is a RecursionError (a 500) far from the request. A lone UTF-16 surrogate
(`"\\ud800"`, which Python's JSON parser accepts, and raw bytes ED A0 80, which it decodes the same
way) is not a Unicode character: tokenizers and UTF-8 encoders raise TypeError or
UnicodeEncodeError on it. Both are refused here, up front, with a 400 that names the parameter.
"""

from __future__ import annotations

from typing import Any

from api.errors import APIError, param_path

# A JSON schema of 20 nested objects is about 45 levels of the request body (each object adds
# "properties" and the property's own schema); 300 levels broke pickling before this limit.
MAX_JSON_DEPTH = 64
_PARAM_PARTS = 4  # how much of a deep value's path names the parameter ("tools[0].function.parameters")


def check_request_tree(body: Any, root: tuple[str | int, ...] = ()) -> None:
    """Raises a 400 APIError for a value nested deeper than MAX_JSON_DEPTH or a string (key or
    value) that is not valid Unicode. Iterative, so the check itself cannot hit the recursion limit.

    `root` is where `body` sits in the request (a parsed JSON string inside it), for the param.
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, root)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if len(path) - len(root) >= MAX_JSON_DEPTH:
            raise too_deep(path[: max(len(root), _PARAM_PARTS)])
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    _check_text(key, (*path, key))
                stack.append((item, (*path, key)))
        else:
            stack.extend((item, (*path, index)) for index, item in enumerate(value))


def too_deep(path: tuple[str | int, ...]) -> APIError:
    param = _param(path)
    return APIError(
        400,
        f"Invalid value for '{param}': JSON nested deeper than {MAX_JSON_DEPTH} levels.",
        param=param,
        code="nesting_too_deep",
    )


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        param = _param(path) or "body"
        code_point = ord(text[error.start])
        raise APIError(
            400,
            f"Invalid value for '{param}': contains a lone UTF-16 surrogate (U+{code_point:04X}), "
            "which is not valid Unicode.",
            param=param,
            code="invalid_unicode",
        ) from None


def _param(path: tuple[str | int, ...]) -> str:
    """`("messages", 0, "content")` -> `"messages[0].content"`, with keys made encodable."""
    return param_path([part if isinstance(part, int) else _printable(part) for part in path]) or ""


def _printable(key: str) -> str:
    # A key may itself hold the surrogate being reported; the error body must still encode.
    return key.encode("utf-8", "backslashreplace").decode("utf-8")
