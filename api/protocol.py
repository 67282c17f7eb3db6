"""Pydantic models of the OpenAI request and response bodies the server speaks.

Requests carry OpenAI's documented ranges as constraints, so FastAPI rejects a bad value before any
handler runs (and the ranges show up in /openapi.json). Unknown fields are ignored, as OpenAI does:
clients written for a newer API version must keep working. Numbers are strict: no NaN or Infinity
(Python's JSON parser accepts them), no `true` for a number, no `2.0` for a count.
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from api.input_limits import check_request_tree
from engine.sampling.sampling_params import MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_STOP_STRINGS

MAX_N = 128  # OpenAI's limit on choices per request
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Strict: a count is a JSON integer (not true, not 2.0); a number is an integer or a float (not true).
Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
StopStrings = Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)]


logger = logging.getLogger(__name__)


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)


class _UnknownFieldLog:
    """Request fields the server ignores, each logged once (at warning level) so an operator sees what
    clients send that does nothing, without a log line per request."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def note(self, request_type: str, names: set[str]) -> None:
        with self._lock:
            new = sorted(names - self._seen)
            self._seen.update(new)
        for name in new:
            logger.warning("Ignoring the unknown field %r of %s requests (logged once per name)", name, request_type)


UNKNOWN_FIELDS = _UnknownFieldLog()


class TopLevelRequest(OpenAIModel):
    """A request body: unknown fields are ignored, as OpenAI and vLLM do, and logged once per name."""

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = set(data) - known
            if unknown:
                UNKNOWN_FIELDS.note(cls.__name__, unknown)
        return data


# ---- chat messages ---------------------------------------------------------------------------


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(OpenAIModel):
    data: str
    format: str


class AudioPart(OpenAIModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(OpenAIModel):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(OpenAIModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")]


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


Content = str | list[ContentPart]


class SystemMessage(OpenAIModel):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(OpenAIModel):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(OpenAIModel):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"]
    content: Content | None = None  # may be null when the turn only called tools
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(OpenAIModel):
    role: Literal["tool"]
    content: Content
    tool_call_id: str  # which call of the previous assistant turn this answers


# One schema per role, as OpenAI documents them: what each role requires is in /openapi.json.
ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


# ---- tools and structured outputs ------------------------------------------------------------


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(OpenAIModel):
    type: Literal["text"]


class ResponseFormatJSONObject(OpenAIModel):
    type: Literal["json_object"]


class JSONSchemaFormat(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(OpenAIModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False


class StructuredOutputsField(TopLevelRequest):
    """vLLM's `structured_outputs`: one of json (a schema), regex, choice, grammar (EBNF), json_object.

    Its other options (structural_tag, whitespace_pattern, ...) are ignored, and logged once, like
    unknown request fields."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(TopLevelRequest):
    """Parameters shared by chat and text completions: OpenAI's, then the vLLM extensions."""

    @model_validator(mode="before")
    @classmethod
    def _check_limits(cls, data: Any) -> Any:
        # On the raw JSON, before any field is validated: nesting depth and valid Unicode. Raises
        # APIError, which pydantic does not wrap, so the 400 keeps its own param and code.
        check_request_tree(data)
        return data

    model: str
    n: Int = Field(default=1, ge=1, le=MAX_N)
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Number | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | StopStrings | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(strict=True, ge=-100.0, le=100.0)]] | None = None
    seed: Int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # OpenAI's for chat; for text completions a vLLM extension (the same JSON mode and JSON schema).
    response_format: ResponseFormat | None = None
    # vLLM extensions
    top_k: Int | None = Field(default=None, ge=-1)  # above the vocabulary size: no filtering
    min_p: Number | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Number | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    min_tokens: Int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    # vLLM: the prompt tokens' logprobs, each with this many alternatives, as `prompt_logprobs`.
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM: keep only the last k prompt tokens; -1: the last max_model_len.
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    structured_outputs: StructuredOutputsField | None = None
    # vLLM's older names for the same constraints.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extensions for the chat template
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # this request's own Jinja template instead of the server's
    echo: bool = False  # vLLM: the answer starts with the last message's content


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    # 0 with echo: score the prompt only (lm-eval-harness), as vLLM allows.
    max_tokens: Int | None = Field(default=16, ge=0)
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = Field(default=None, ge=1, le=MAX_N)


# ---- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None  # null when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None
    # With a reasoning parser: the thinking before the answer (vLLM's older and newer names).
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, as in CompletionChoice


class DeltaFunctionCall(BaseModel):
    name: str | None = None  # in the first delta of a call only
    arguments: str | None = None  # a fragment; the fragments concatenate to the call's arguments


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None  # in the first delta of a call only
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed chat completion (documentation only)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's shape: per prompt token (null for the first), {token id: {logprob, rank, decoded_token}}.
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# ---- vLLM's tokenizer routes -----------------------------------------------------------------


class TokenizeCompletionRequest(TopLevelRequest):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(TopLevelRequest):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None


def _tokenize_kind(body: Any) -> str:
    return "chat" if isinstance(body, dict) and "messages" in body else "completion"


# A body with `messages` is a chat request, any other a text one (so each is judged, and its unknown
# fields logged, as the one kind it is).
TokenizeRequest = Annotated[
    Annotated[TokenizeChatRequest, Tag("chat")] | Annotated[TokenizeCompletionRequest, Tag("completion")],
    Discriminator(_tokenize_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(TopLevelRequest):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sluicegate"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
