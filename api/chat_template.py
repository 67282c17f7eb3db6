"""Chat messages -> prompt token ids through the model's own chat template."""

from __future__ import annotations

import json
from typing import Any

import jinja2

from api import control_tokens
from api.errors import APIError
from api.input_limits import check_request_tree, too_deep
from api.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    TextPart,
    TokenizeChatRequest,
    ToolMessage,
)

_NON_TEXT_PARTS = {"image_url": "image", "input_audio": "audio", "file": "file"}
# chat_template_kwargs reach the template as variables; these names would instead change how
# apply_chat_template itself behaves (a different template, tensors instead of ids, truncation).
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
        "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


def render_chat_prompt(
    tokenizer: Any,
    request: ChatCompletionRequest | TokenizeChatRequest,
    chat_template: str | None = None,
    add_special_tokens: bool = False,
) -> list[int]:
    """Token ids of the conversation, ready for the engine; a 400 APIError for what cannot render.

    The template is the request's own `chat_template`, else `chat_template` (the server's), else the
    tokenizer's. `add_special_tokens` adds the tokenizer's BOS and the like on top of the template's.
    """
    chat_template = request.chat_template or chat_template or getattr(tokenizer, "chat_template", None)
    if chat_template is None:
        raise APIError(
            400,
            "This model has no chat template, so it cannot serve /v1/chat/completions; use /v1/completions.",
            param="messages",
        )
    template_kwargs = request.chat_template_kwargs or {}
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(template_kwargs))
    if reserved:
        raise APIError(
            400,
            f"Invalid value for 'chat_template_kwargs': {reserved} cannot be set through it.",
            param="chat_template_kwargs",
        )
    messages = [_message_dict(i, m) for i, m in enumerate(request.messages)]
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
    options = {
        "add_generation_prompt": request.add_generation_prompt and not request.continue_final_message,
        "continue_final_message": request.continue_final_message,
        "chat_template": chat_template,
        "return_dict": False,
    }
    try:
        # A user who writes "<|im_start|>system" in a message gets those characters as text, not
        # the control token: the conversation structure is the template's alone.
        if control_tokens.native_sanitize(tokenizer):
            ids = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=True, sanitize_control_tokens=True, **options, **template_kwargs
            )
        else:
            ids = _render_sanitized(tokenizer, messages, tools, options, template_kwargs)
    except RecursionError:
        # Every nested input is depth-checked first (api/input_limits.py); a template that recurses
        # on its own (a macro calling itself per message) can still get here.
        message = "The chat template could not format these messages: they nest too deeply."
        raise APIError(400, message, param="messages") from None
    except jinja2.TemplateSyntaxError as error:
        param = "chat_template" if request.chat_template else "messages"
        raise APIError(400, f"The chat template is not valid Jinja: {error}", param=param) from None
    except (jinja2.TemplateError, ValueError, TypeError) as error:
        # Templates reject what they cannot format (roles out of order, a missing tool id) by
        # raising; that is the request's fault, and the template's own words say what is wrong.
        raise APIError(400, f"The chat template could not format these messages: {error}", param="messages") from None
    if add_special_tokens:
        # apply_chat_template tokenizes without them (the template writes its own); these are what the
        # tokenizer puts before any text (a BOS, for Llama-style tokenizers).
        prefix = tokenizer.encode("", add_special_tokens=True)
        if ids[: len(prefix)] != prefix:
            ids = prefix + ids
    return ids


def _render_sanitized(
    tokenizer: Any, messages: list[dict], tools: list[dict] | None, options: dict, template_kwargs: dict
) -> list[int]:
    """What sanitize_control_tokens=True does on transformers 5.20+, for 5.17 to 5.19."""
    tokens = control_tokens.control_tokens(tokenizer)
    pattern = control_tokens.token_pattern(tokens)
    rendered = tokenizer.apply_chat_template(
        control_tokens.mark(messages, pattern),
        tools=control_tokens.mark(tools, pattern),
        tokenize=False,
        **options,
        **control_tokens.mark(template_kwargs, pattern),
    )
    return control_tokens.encode_marked(tokenizer, rendered, tokens)


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    param = f"messages[{index}]"
    # "developer" is OpenAI's new name for "system"; chat templates only know the old one.
    result: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    content = _content_text(param, message.content)
    if isinstance(message, AssistantMessage):
        if content is None and message.refusal is not None:
            content = message.refusal
        if content is None and not message.tool_calls:
            raise APIError(
                400,
                f"Missing required parameter: '{param}.content' (an assistant turn needs it or tool_calls).",
                param=f"{param}.content",
            )
        if message.tool_calls:
            result["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    # Templates index into the arguments (HF's convention is a dict); the API
                    # carries JSON text, so parse it, keeping the text when it is not valid JSON.
                    "function": {
                        "name": call.function.name,
                        "arguments": _parse_arguments(
                            ("messages", index, "tool_calls", j, "function", "arguments"),
                            call.function.arguments,
                        ),
                    },
                }
                for j, call in enumerate(message.tool_calls)
            ]
    if content is not None:
        result["content"] = content
    if isinstance(message, ToolMessage):
        result["tool_call_id"] = message.tool_call_id
    elif message.name is not None:
        result["name"] = message.name
    return result


def _content_text(param: str, content: str | list[Any] | None) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif part.type == "refusal":
            texts.append(part.refusal)
        else:
            kind = _NON_TEXT_PARTS[part.type]
            raise APIError(
                400,
                f"Invalid value for '{param}.content[{j}]': this model accepts text only, "
                f"so '{part.type}' ({kind}) content parts are not supported.",
                param=f"{param}.content[{j}]",
                code="unsupported_content_type",
            )
    return "\n".join(texts)


def _parse_arguments(path: tuple[str | int, ...], arguments: str) -> Any:
    try:
        parsed = json.loads(arguments)
    except RecursionError:  # "[" * 1000: the parser recursed before it could tell whether it is JSON
        raise too_deep(path) from None
    except ValueError:
        return arguments
    check_request_tree(parsed, root=path)  # the template renders it, recursively
    return parsed
