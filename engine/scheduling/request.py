"""One sequence's state as the scheduler and engine see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.outputs import TokenLogprob
from engine.sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.sampling.structured_outputs import SequenceGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A sequence to generate. A user request with n > 1 becomes n of these (one per sample).

    Its tokens are prompt + output; num_computed_tokens of them have K/V in the cache (or are
    queued to). Each step computes the next slice of uncomputed tokens; when a slice reaches the
    end of the tokens, the step samples one more. That single rule covers prefill, chunked
    prefill, decode, prefix-cache hits (which advance num_computed_tokens for free) and recompute
    after preemption. With async scheduling, a token still being sampled on the device counts as
    a token too: the next step computes it, reading its input id on the device, before the host
    knows its value.
    """

    request_id: str  # the sequence id: "<user request id>" or "<user request id>#<index>"
    prompt_token_ids: list[int]
    params: SamplingParams
    user_request_id: str = ""  # the request this sequence is one sample of
    sample_index: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # Tokens scheduled for a forward pass, including the step queued on the device right now: a
    # step may be scheduled before the previous one finishes (their K/V is written in step order).
    num_computed_tokens: int = 0
    # Tokens sampled on the device whose values the host has not read yet: with async scheduling,
    # the last step's (0 or 1). They count as tokens of the sequence when scheduling its next step.
    num_inflight_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain digests of this sequence's full blocks
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    seed: int | None = None  # params.seed + sample_index, when the request is seeded
    # The constraint's matcher when params.structured_outputs is set; it advances with each sampled
    # token and, like the output ids, survives preemption (which recomputes K/V, not tokens).
    grammar: SequenceGrammar | None = None
    num_preemptions: int = 0
    # Speculative decoding: tokens proposed to follow the last known token, verified by the next
    # step (which computes them after it, as 1 + k query tokens). Empty when not speculating.
    spec_token_ids: list[int] = field(default_factory=list)
    # A draft model's progress: positions [0, n) of its own KV cache (at this sequence's block ids)
    # hold K/V of the sequence's real tokens. Reset with num_computed_tokens on preemption.
    num_draft_computed_tokens: int = 0
    # Speculative decoding: a moving average of the share of this sequence's proposals accepted,
    # and the steps since it was last given any (a sequence whose proposals fail stops getting
    # them, and is tried again now and then: `Speculator.propose`).
    spec_acceptance: float = 1.0
    spec_steps_since_proposal: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_target(self) -> int:
        """The tokens a step may compute: the known ones plus those still being sampled."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_in(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end), without concatenating prompt and output."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
