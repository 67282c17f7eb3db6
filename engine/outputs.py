"""What the engine hands back for each request (shaped like vLLM's outputs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probabilities of one generated token, from the model's raw distribution."""

    token_id: int
    logprob: float
    # The most likely alternatives, most likely first: (token_id, logprob).
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # 1-based rank of token_id in its distribution (prompt logprobs only)


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
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing
    # predicts it). In the first output only for DELTA outputs, in every one otherwise.
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_delta_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive DELTA outputs of one request as one: each sample's new text, tokens and
    logprobs concatenated, its state (finish, cumulative logprob) and the request's from the later."""
    merged = {c.index: c for c in earlier.outputs}
    for completion in later.outputs:
        before = merged.get(completion.index)
        if before is None:
            merged[completion.index] = completion
            continue
        logprobs = None
        if before.logprobs is not None or completion.logprobs is not None:
            logprobs = (before.logprobs or []) + (completion.logprobs or [])
        merged[completion.index] = dataclasses.replace(
            completion,
            text=before.text + completion.text,
            token_ids=before.token_ids + completion.token_ids,
            logprobs=logprobs,
        )
    prompt_logprobs = later.prompt_logprobs if later.prompt_logprobs is not None else earlier.prompt_logprobs
    return dataclasses.replace(
        later, outputs=[merged[index] for index in sorted(merged)], prompt_logprobs=prompt_logprobs
    )
