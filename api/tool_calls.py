"""Tool calling in chat completions: what a request's tools allow, and its output read back as calls.

- No tools, or tool_choice "none": the output is content; no parser runs.
- "auto" (the default with tools): the model writes freely; the model family's parser (from the chat
  template, or --tool-call-parser) finds the calls it wrote. Without a parser the output is content.
- "required" or a named function: the output is constrained to calls in the model family's format
  (`api.tool_constraints`: llama3_json for Llama 3 templates, hermes otherwise), then read back
  with that format's parser.

The message carries `tool_calls` and the text outside them (null when there is none); its
finish_reason is "tool_calls" when the output has calls and ended on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from api.errors import APIError, bad_request_from_value_error
from api.protocol import ChatCompletionRequest
from api.tool_constraints import CALL_FORMATS, forced_tool_call_constraint
from api.tool_parsers import (
    ContentDelta,
    HermesToolParser,
    ToolCallArgumentsDelta,
    ToolCallParser,
    ToolCallStart,
    ToolParserEvent,
)
from engine.sampling.structured_outputs import StructuredOutputsParams


@dataclass(frozen=True)
class ToolCallPlan:
    """How a request's tools shape its output."""

    parser: ToolCallParser | None = None  # reads calls back from the output; None: content only
    constraint: StructuredOutputsParams | None = None  # set when calls are forced
    max_calls: int | None = None  # 1 when parallel_tool_calls is false; None: no limit

    @property
    def forced(self) -> bool:
        return self.constraint is not None

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """A complete output as the assistant message, and whether it holds tool calls."""
        if self.parser is None:
            return {"role": "assistant", "content": text}, False
        parsed = self.parser.parse(text)
        calls = parsed.calls[: self.max_calls]
        if not calls:
            # The output verbatim: what the parser saw as content, including any malformed call.
            return {"role": "assistant", "content": text}, False
        return {
            "role": "assistant",
            "content": parsed.content,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in calls
            ],
        }, True

    def stream_reader(self) -> ToolCallDeltas | None:
        """A reader for one streamed choice; None when the output is plain content."""
        return ToolCallDeltas(self.parser, self.max_calls) if self.parser is not None else None


NO_TOOL_CALLS = ToolCallPlan()


async def plan_tool_calls(
    request: ChatCompletionRequest, auto_parser: ToolCallParser | None, content_constrained: bool = False
) -> ToolCallPlan:
    """The plan for a request's tools and tool_choice; a 400 APIError for a choice it cannot honour.

    `auto_parser` reads the model family's calls in "auto" mode; `content_constrained` says that
    response_format already constrains the output to JSON, which leaves "auto" no room for a call.
    """
    tools, choice = request.tools, request.tool_choice
    if choice is not None and not tools:
        raise APIError(
            400, "Invalid value for 'tool_choice': only allowed when 'tools' are given.", param="tool_choice"
        )
    if not tools or choice == "none":
        return NO_TOOL_CALLS
    max_calls = 1 if request.parallel_tool_calls is False else None
    if choice is None or choice == "auto":
        if content_constrained:
            # The JSON the output must be is content: parsing it as calls (Llama 3's calls are bare
            # JSON objects) could turn the answer the client asked for into a call it did not expect.
            return NO_TOOL_CALLS
        return ToolCallPlan(parser=auto_parser, max_calls=max_calls)
    # Forced calls take the model family's own format where we can write it, hermes otherwise.
    parser = auto_parser if auto_parser is not None and auto_parser.name in CALL_FORMATS else HermesToolParser()
    try:
        # Off the event loop: the first forced call imports xgrammar and each new tool set compiles
        # its schemas (cached afterwards), both too slow to stall every other stream for.
        constraint = await asyncio.to_thread(
            forced_tool_call_constraint, tools, choice, parallel_tool_calls=max_calls is None, call_format=parser.name
        )
    except ValueError as error:
        # It names 'tools' or 'tool_choice'; 'structured_outputs' when xgrammar is missing.
        raise bad_request_from_value_error(
            error, default_param="tool_choice", renames={"structured_outputs": "tool_choice"}
        ) from None
    return ToolCallPlan(parser=parser, constraint=constraint, max_calls=max_calls)


def tool_finish_reason(engine_reason: str | None, has_calls: bool) -> str | None:
    """The choice's finish_reason: "tool_calls" for an output with calls that ended on its own.

    An output cut off ("length") keeps that reason: its last call may be incomplete.
    """
    return "tool_calls" if has_calls and engine_reason == "stop" else engine_reason


class ToolCallDeltas:
    """One streamed choice: text deltas in, OpenAI chat deltas out (content, and calls piece by piece).

    The first delta of each call carries its index, id, type and name, with empty arguments; later
    ones carry `{"index", "function": {"arguments": fragment}}`, the fragments adding up to the
    arguments of the non-streamed answer.
    """

    def __init__(self, parser: ToolCallParser, max_calls: int | None = None) -> None:
        self._stream = parser.stream()
        self._max_calls = max_calls
        self.has_calls = False

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """The deltas `text` completes, in order; `final` flushes what the parser held back."""
        events = self._stream.feed(text) if text else []
        if final:
            events += self._stream.finish()
        return self._deltas(events)

    def _deltas(self, events: list[ToolParserEvent]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ContentDelta):
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += event.text
                else:
                    deltas.append({"content": event.text})
            elif self._max_calls is not None and event.index >= self._max_calls:
                continue  # parallel_tool_calls is false: only the first call counts
            elif isinstance(event, ToolCallStart):
                self.has_calls = True
                function = {"name": event.name, "arguments": ""}
                call = {"index": event.index, "id": event.id, "type": "function", "function": function}
                deltas.append({"tool_calls": [call]})
            else:
                assert isinstance(event, ToolCallArgumentsDelta)
                previous = deltas[-1]["tool_calls"][0] if deltas and "tool_calls" in deltas[-1] else None
                if previous is not None and "id" not in previous and previous["index"] == event.index:
                    previous["function"]["arguments"] += event.arguments  # one delta per engine output
                else:
                    deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]})
        return deltas
