"""Tool-call parsers: a model's output text -> the text outside the calls and the calls themselves.

Each model family writes tool calls in its own format; the chat template tells which. Supported:
- "hermes" (Qwen2.5/Qwen3, Hermes 2 Pro and their templates):
  `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, possibly several, possibly after text.
- "llama3_json" (Llama 3.1+ JSON tool calling): the whole output is `{"name": "f", "parameters": {...}}`,
  optionally after `<|python_tag|>`, several separated by `;`.

Both are parsed by one incremental machine per format, fed text deltas. Streaming, it emits events:
content deltas, the start of each call (index, id, name) as soon as its name is known, and fragments
of its arguments as they arrive; `parse(text)` runs the same machine over the whole text, so both give
the same final result. Arguments are the model's own JSON text for the arguments object (the
fragments concatenate to exactly it). A call whose JSON is malformed stays in the content verbatim;
streaming, that holds for JSON that breaks before the call's name is complete. Once the name has gone
out, a stream cannot take it back: the call keeps the arguments text it had (see the tests).

Whitespace outside the calls is held back until more text follows it: whitespace right before a call,
between calls and at the end of an output with calls is dropped (it is only the format's layout).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI's function.arguments
    id: str = field(default_factory=new_tool_call_id)


@dataclass
class ParsedToolCalls:
    content: str | None  # the text outside the calls; None when there is none
    calls: list[ToolCall]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    index: int
    arguments: str  # the next fragment of the call's arguments JSON text


ToolParserEvent = ContentDelta | ToolCallStart | ToolCallArgumentsDelta


def collect(events: list[ToolParserEvent]) -> ParsedToolCalls:
    """The final result a sequence of events describes."""
    content: list[str] = []
    calls: list[ToolCall] = []
    arguments: list[list[str]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            assert event.index == len(calls), "calls start in index order"
            calls.append(ToolCall(name=event.name, arguments="", id=event.id))
            arguments.append([])
        else:
            arguments[event.index].append(event.arguments)
    for call, parts in zip(calls, arguments):
        call.arguments = "".join(parts)
    return ParsedToolCalls(content="".join(content) or None, calls=calls)


# ---- one call's JSON object -------------------------------------------------------------------------

# `{"name": "<name>", "arguments": {` (or "parameters"): once this much is in, the call's name is known
# and everything after it, up to the end of that object, is its arguments. Other key orders are parsed
# when the whole call is in.
_NAME_FIRST = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


class _JsonScanner:
    """Finds where a JSON object or array ends, fed its text chunk by chunk from its opening bracket.

    Tracks only strings and bracket depth: enough to find the end, which is all streaming needs; the
    text is validated with json.loads once complete.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def feed(self, chunk: str) -> int | None:
        """Index in `chunk` just past the closing bracket if it is in this chunk, else None."""
        if self.done:
            return None
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for pos, char in enumerate(chunk):
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    self.done = True
                    return pos + 1
        self.depth, self.in_string, self.escaped = depth, in_string, escaped
        return None


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a complete call object, or None if it is not one.

    JSON nested past Python's recursion limit (a model can write "[" a thousand times) is not a call.
    """
    match = _NAME_FIRST.match(body)
    if match is not None:
        end = _JsonScanner().feed(body[match.end() :])
        if end is None:
            return None
        arguments = body[match.end() : match.end() + end]
        try:
            name, value = json.loads(match.group(1)), json.loads(arguments)
        except (ValueError, RecursionError):
            return None
        return (name, arguments) if isinstance(value, dict) else None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    value = obj.get("arguments", obj.get("parameters"))
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            if isinstance(json.loads(value), dict):
                return obj["name"], value
        except (ValueError, RecursionError):
            return None
    if isinstance(value, dict):
        return obj["name"], json.dumps(value, ensure_ascii=False)
    return None


class _CallBuilder:
    """One call being read: announces it once its name is known, then streams its arguments."""

    def __init__(self, index: int, stream_early: bool) -> None:
        self.index = index
        self.body = ""
        self.stream_early = stream_early
        self.start: ToolCallStart | None = None
        self.whitespace_before = ""  # content whitespace held when the call began
        self._arguments_scanner = _JsonScanner()
        self._arguments_start = 0  # where the arguments object starts in body, once announced
        self._arguments_end: int | None = None
        self._arguments_sent = 0

    def extend(self, text: str, events: list[ToolParserEvent]) -> None:
        self.body += text
        if not self.stream_early:
            return
        if self.start is None:
            match = _NAME_FIRST.match(self.body)
            if match is None:
                return
            try:
                name = json.loads(match.group(1))
            except ValueError:
                return
            self._announce(name, events)
            self._arguments_start = match.end()
            text = self.body[match.end() :]  # all the arguments received so far are new to the scanner
        if self._arguments_end is None:
            end = self._arguments_scanner.feed(text)
            if end is not None:
                self._arguments_end = len(self.body) - len(text) + end
            arguments_end = len(self.body) if self._arguments_end is None else self._arguments_end
            self._send_arguments(self.body[self._arguments_start : arguments_end], events)

    def close(self, events: list[ToolParserEvent]) -> bool:
        """The body is complete: emits what is left of the call; False if it is not a call."""
        parsed = _parse_call(self.body)
        if self.start is None:
            if parsed is None:
                return False
            self._announce(parsed[0], events)
            self._send_arguments(parsed[1], events)
            return True
        # Announced while streaming: the rest of its arguments, if they turned out well-formed. If not,
        # the call keeps what was sent (a stream cannot take events back).
        sent = self.body[self._arguments_start : self._arguments_start + self._arguments_sent]
        if parsed is not None and parsed[1].startswith(sent):
            self._send_arguments(parsed[1], events)
        return True

    def _announce(self, name: str, events: list[ToolParserEvent]) -> None:
        self.start = ToolCallStart(index=self.index, id=new_tool_call_id(), name=name)
        events.append(self.start)

    def _send_arguments(self, arguments_so_far: str, events: list[ToolParserEvent]) -> None:
        fragment = arguments_so_far[self._arguments_sent :]
        if fragment:
            events.append(ToolCallArgumentsDelta(index=self.index, arguments=fragment))
            self._arguments_sent = len(arguments_so_far)


# ---- streams ----------------------------------------------------------------------------------------


class ToolCallStream(ABC):
    """Incremental parser of one output: feed() each text delta, then finish() once at the end."""

    def __init__(self, stream_early: bool = True) -> None:
        self._stream_early = stream_early
        self._buffer = ""  # text received but not yet consumed
        self._held_whitespace = ""  # content whitespace waiting to see what follows it
        self._events: list[ToolParserEvent] = []
        self.num_calls = 0
        self._finished = False

    def feed(self, text: str) -> list[ToolParserEvent]:
        assert not self._finished, "feed() after finish()"
        self._buffer += text
        events: list[ToolParserEvent] = []
        self._consume(events, final=False)
        self._events += events
        return events

    def finish(self) -> list[ToolParserEvent]:
        """Flushes the held text and closes an unterminated call (a call the output ended inside)."""
        assert not self._finished, "finish() twice"
        self._finished = True
        events: list[ToolParserEvent] = []
        self._consume(events, final=True)
        if self._held_whitespace and self.num_calls == 0:
            events.append(ContentDelta(self._held_whitespace))
        self._held_whitespace = ""
        self._events += events
        return events

    def result(self) -> ParsedToolCalls:
        """Everything parsed so far (the final result once finish() has run)."""
        return collect(self._events)

    @abstractmethod
    def _consume(self, events: list[ToolParserEvent], final: bool) -> None:
        """Turns as much of self._buffer into events as can be decided; all of it when final."""

    def _content(self, text: str, events: list[ToolParserEvent]) -> None:
        if not text:
            return
        stripped = text.rstrip()
        if stripped:
            events.append(ContentDelta(self._held_whitespace + stripped))
            self._held_whitespace = ""
        self._held_whitespace += text[len(stripped) :]

    def _new_call(self) -> _CallBuilder:
        call = _CallBuilder(self.num_calls, self._stream_early)
        # The layout before a call is not content, unless the call turns out not to be one.
        call.whitespace_before, self._held_whitespace = self._held_whitespace, ""
        self.num_calls += 1
        return call

    def _drop_call(self, call: _CallBuilder, raw_text: str, events: list[ToolParserEvent]) -> None:
        """A call that turned out malformed before it was announced: its text is content after all."""
        assert call.start is None and call.index == self.num_calls - 1
        self.num_calls -= 1
        self._held_whitespace = call.whitespace_before + self._held_whitespace
        self._content(raw_text, events)


class HermesToolCallStream(ToolCallStream):
    START = "<tool_call>"
    END = "</tool_call>"

    def __init__(self, stream_early: bool = True) -> None:
        super().__init__(stream_early)
        self._call: _CallBuilder | None = None

    def _consume(self, events: list[ToolParserEvent], final: bool) -> None:
        while True:
            if self._call is None:
                index = self._buffer.find(self.START)
                if index < 0:
                    keep = 0 if final else _partial_tag_len(self._buffer, self.START)
                    self._content(self._buffer[: len(self._buffer) - keep], events)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                self._content(self._buffer[:index], events)
                self._buffer = self._buffer[index + len(self.START) :]
                self._call = self._new_call()
                continue
            index = self._buffer.find(self.END)
            if index < 0 and not final:
                keep = _partial_tag_len(self._buffer, self.END)
                self._call.extend(self._buffer[: len(self._buffer) - keep], events)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return
            # The call's body is complete: up to the end tag, or to the end of an output that stopped
            # without one (models often end a turn right after the JSON).
            closing = index >= 0
            body_end = index if closing else len(self._buffer)
            call, self._call = self._call, None
            call.extend(self._buffer[:body_end], events)
            self._buffer = self._buffer[body_end + len(self.END) if closing else body_end :]
            if not call.close(events):
                self._drop_call(call, self.START + call.body + (self.END if closing else ""), events)


class Llama3JsonToolCallStream(ToolCallStream):
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, stream_early: bool = True) -> None:
        super().__init__(stream_early)
        # "start": nothing decided yet; "calls": between call objects (';' separates them);
        # "call": inside a call object; "content": plain text (a python tag still starts calls).
        self._state = "start"
        self._call: _CallBuilder | None = None
        self._scanner = _JsonScanner()

    def _consume(self, events: list[ToolParserEvent], final: bool) -> None:
        while self._buffer or (final and self._call is not None):
            buffer = self._buffer
            if self._state == "start":
                stripped = buffer.lstrip()
                if stripped.startswith(self.PYTHON_TAG):
                    self._buffer, self._state = stripped[len(self.PYTHON_TAG) :], "calls"
                elif stripped.startswith("{"):
                    self._buffer, self._state = stripped, "calls"
                elif not final and self.PYTHON_TAG.startswith(stripped):
                    return  # only whitespace or the start of a python tag so far
                else:
                    self._state = "content"
            elif self._state == "content":
                index = buffer.find(self.PYTHON_TAG)
                if index < 0:
                    keep = 0 if final else _partial_tag_len(buffer, self.PYTHON_TAG)
                    self._content(buffer[: len(buffer) - keep], events)
                    self._buffer = buffer[len(buffer) - keep :]
                    return
                self._content(buffer[:index], events)
                self._buffer, self._state = buffer[index + len(self.PYTHON_TAG) :], "calls"
            elif self._state == "calls":
                stripped = buffer.lstrip()
                if stripped.startswith(";"):
                    self._buffer = stripped[1:]
                elif stripped.startswith("{"):
                    self._buffer, self._state = stripped, "call"
                    self._call, self._scanner = self._new_call(), _JsonScanner()
                elif stripped:
                    self._buffer, self._state = stripped, "content"  # text after the calls
                else:
                    self._buffer = ""  # whitespace between calls is layout
            else:  # "call"
                call = self._call
                assert call is not None
                end = self._scanner.feed(buffer)
                if end is None and not final:
                    call.extend(buffer, events)
                    self._buffer = ""
                    return
                # The object is complete, or the output ended inside it.
                cut = len(buffer) if end is None else end
                call.extend(buffer[:cut], events)
                self._buffer, self._call = buffer[cut:], None
                if call.close(events):
                    self._state = "calls"
                else:
                    self._drop_call(call, call.body, events)
                    self._state = "content"


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


# ---- parsers and the registry -----------------------------------------------------------------------


class ToolCallParser:
    """A tool-call format: `parse` for a complete output, `stream` for an output arriving in deltas."""

    name: ClassVar[str]
    stream_class: ClassVar[type[ToolCallStream]]

    def stream(self) -> ToolCallStream:
        """A new incremental parser for one streamed output."""
        return self.stream_class(stream_early=True)

    def parse(self, text: str) -> ParsedToolCalls:
        """The content and calls of a complete output."""
        # The streaming machine itself, so both agree; without early announcements, so that a call
        # is judged on its whole text (a malformed one is content).
        stream = self.stream_class(stream_early=False)
        stream.feed(text)
        stream.finish()
        return stream.result()


class HermesToolParser(ToolCallParser):
    name = "hermes"
    stream_class = HermesToolCallStream


class Llama3JsonToolParser(ToolCallParser):
    name = "llama3_json"
    stream_class = Llama3JsonToolCallStream


TOOL_PARSERS: dict[str, type[ToolCallParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> ToolCallParser:
    """The parser registered as `name` (what --tool-call-parser selects)."""
    parser = TOOL_PARSERS.get(name)
    if parser is None:
        raise ValueError(f"Invalid value for 'tool_call_parser': must be one of {sorted(TOOL_PARSERS)}, got {name!r}")
    return parser()


def parser_for_template(chat_template: str | dict[str, Any] | None) -> str | None:
    """The tool-call format a chat template teaches its model, or None if it is not a known one."""
    if not chat_template:
        return None
    if isinstance(chat_template, dict):  # named templates (e.g. "default", "tool_use")
        chat_template = "\n".join(str(t) for t in chat_template.values())
    if "<tool_call>" in chat_template:
        return HermesToolParser.name
    # Llama 3.1+: built-in tools go after <|python_tag|>; custom tools are described as JSON with
    # "parameters" ("Respond in the format {"name": function name, "parameters": ...}").
    if "<|python_tag|>" in chat_template or '"parameters": dictionary of argument name' in chat_template:
        return Llama3JsonToolParser.name
    return None
