"""What the engine hands back for each request (shaped like vLLM's outputs)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probabilities of one generated token, from the model's raw distribution."""

    token_id: int
    logprob: float
    # The most likely alternatives, most likely first: (token_id, logprob).
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # Tokens generated so far over all samples, whatever the output kind.
    num_generated_tokens: int = 0
    # Seconds from arrival to first scheduling; None until the request has been scheduled.
    queue_time: float | None = None
