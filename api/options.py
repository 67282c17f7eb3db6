"""Server settings beyond the engine's: the ones vLLM users pass on the command line (`api.cli`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sampling.sampling_params import MAX_LOGPROBS

# vLLM's defaults for --allowed-origins, --allowed-methods and --allowed-headers: CORS open to all.
ALLOW_ALL = ("*",)


@dataclass(frozen=True)
class ServerOptions:
    # More names clients may pass as `model` (vLLM: every name of --served-model-name after the first).
    served_model_aliases: tuple[str, ...] = ()
    # A chat template (Jinja text) used instead of the tokenizer's own; a request may still name its own.
    chat_template: str | None = None
    # "qwen3" or "deepseek_r1" (api.reasoning); None: detected from the chat template where unambiguous.
    reasoning_parser: str | None = None
    # The most logprobs (top_logprobs, logprobs) a request may ask for; the engine's limit is MAX_LOGPROBS.
    max_logprobs: int = MAX_LOGPROBS
    # Log every request's parameters at info level (vLLM's --enable-log-requests).
    log_requests: bool = False
    # The URL prefix a proxy in front of the server strips (ASGI root_path).
    root_path: str = ""
    allowed_origins: tuple[str, ...] = ALLOW_ALL
    allowed_methods: tuple[str, ...] = ALLOW_ALL
    allowed_headers: tuple[str, ...] = ALLOW_ALL
    allow_credentials: bool = False
    # Defaults for request fields a request leaves out (temperature, top_p, top_k, min_p,
    # repetition_penalty, max_tokens), from --generation-config; empty: OpenAI's defaults.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"Invalid value for 'max_logprobs': must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}"
            )
