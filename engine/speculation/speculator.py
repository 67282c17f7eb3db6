"""Speculative decoding in the engine: which sequences get proposals, how proposals are verified,
and the counters.

The rule that keeps answers unchanged (DESIGN.md): a step that carries k proposals d1..dk after a
sequence's last token t computes the target model's own token at each of the k + 1 positions,
exactly as plain decoding would there (the sampler sees the output plus the proposals before the
position: the same penalties, bias, min_tokens masking and seeded noise, which is a function of
(seed, position) only). Proposal j is kept while it equals the target's token at its position; the
target's token after the last kept proposal is appended too. So a greedy or seeded request gives
the same tokens with speculation on or off, and an unseeded one still draws each token from the
target's distribution. Grammar-constrained sequences are not speculated (their mask at position j
would need the matcher advanced through the proposals, then rolled back); they decode as usual.

Steps that carry proposals are synchronous: the next step's proposals continue the tokens this one
accepts, which the host learns only when it ends. Steps without proposals keep async scheduling.
With async scheduling, proposing first means reading the step in flight (losing the overlap of the
host's work with the device's for that step), so after a step where nothing could be proposed the
speculator sits out 1, 2, 4, ... up to 16 steps before it tries again; under synchronous scheduling
proposing costs no overlap, and it tries every step.
"""

from __future__ import annotations

from typing import Protocol

from engine.scheduling.kv_cache import KVCacheManager
from engine.scheduling.request import Request, RequestStatus
from engine.speculation.config import SpeculativeConfig
from engine.speculation.ngram import NgramProposer

MAX_BACKOFF_STEPS = 16
# A sequence whose proposals are mostly rejected costs the verification of k tokens a step for
# little gain: below this moving-average acceptance it gets none, except one probe every
# PROBE_INTERVAL steps (its text may start repeating later). On the CPU, where verification costs
# nearly as much as the tokens it saves, 8 sequences at 28% acceptance broke even per step and lost
# on the whole batch (benchmarks/RESULTS.md); a GPU's memory-bound decode pays for far less.
MIN_ACCEPTANCE = {"cpu": 0.35, "cuda": 0.1}
ACCEPTANCE_DECAY = 0.7  # the weight of the previous average: about the last three verifications count
PROBE_INTERVAL = 8


class Proposer(Protocol):
    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        """At most num_tokens[i] proposed tokens to follow requests[i]'s last token."""
        ...


def num_accepted(proposed: list[int], target: list[int]) -> int:
    """How many proposals equal the target's token at their position, counted from the first."""
    count = 0
    for draft, token in zip(proposed, target):
        if draft != token:
            break
        count += 1
    return count


class Speculator:
    def __init__(
        self,
        config: SpeculativeConfig,
        kv_cache: KVCacheManager,
        proposer: Proposer | None = None,
        pad_proposals: bool = False,
        device_type: str = "cpu",
    ) -> None:
        """pad_proposals: give every speculated row exactly k proposals (filling with copies of its
        last token), so the step has the shape of the captured 1 + k graphs; fillers are verified
        like any proposal but not counted as proposals in the stats."""
        self.config = config
        self.kv_cache = kv_cache
        self.proposer = proposer or NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.pad_proposals = pad_proposals
        self.max_batch_size = config.batch_size_limit(device_type)
        self.min_acceptance = MIN_ACCEPTANCE.get(device_type, MIN_ACCEPTANCE["cuda"])
        self._num_proposed: dict[Request, int] = {}  # per speculated row, its proposals before padding
        self._backoff = 0  # steps to sit out after the next step that finds nothing to propose
        self._steps_to_sit_out = 0
        k = config.num_speculative_tokens
        self.num_drafts = 0  # sequences verified with at least one proposal
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # Per position j (0-based): proposals made there, and proposals accepted there.
        self.num_draft_tokens_per_pos = [0] * k
        self.num_accepted_tokens_per_pos = [0] * k

    def active(self, num_running: int, draining: bool = False) -> bool:
        """Whether this step speculates: not when the batch is large enough to be compute-bound, nor
        while backing off (`draining`: proposing would first read a step in flight)."""
        if num_running == 0 or num_running > self.max_batch_size:
            return False
        if draining and self._steps_to_sit_out > 0:
            self._steps_to_sit_out -= 1
            return False
        return True

    def propose(self, running: list[Request]) -> list[Request]:
        """Sets spec_token_ids of the running sequences that are decoding, know every token and are
        not grammar-constrained; returns those that got any."""
        k = self.config.num_speculative_tokens
        candidates, budgets = [], []
        for request in running:
            if request.status != RequestStatus.RUNNING or request.grammar is not None:
                continue
            if request.num_inflight_tokens or request.num_computed_tokens != request.num_tokens - 1:
                continue  # still in its prompt, or a token of it is in flight
            # The target's token after the last proposal must not pass max_tokens (which also keeps
            # every verified position inside max_model_len: prompt + max_tokens fits it).
            budget = min(k, request.params.max_tokens - len(request.output_token_ids) - 1)
            if budget <= 0:
                continue
            if request.spec_acceptance < self.min_acceptance and request.spec_steps_since_proposal < PROBE_INTERVAL:
                request.spec_steps_since_proposal += 1
                continue
            request.spec_steps_since_proposal = 0
            candidates.append(request)
            budgets.append(budget)
        if not candidates:
            return []
        proposed = []
        proposals = self.proposer.propose(candidates, budgets)
        for request, tokens, budget in zip(candidates, proposals, budgets, strict=True):
            num_real = len(tokens)
            if self.pad_proposals and num_real < budget == k:
                filler = tokens[-1] if tokens else request.token_ids_in(request.num_tokens - 1, request.num_tokens)[0]
                tokens = tokens + [filler] * (k - num_real)
            request.spec_token_ids = tokens
            if tokens:
                proposed.append(request)
                self._num_proposed[request] = num_real
        if any(self._num_proposed[r] for r in proposed):
            self._backoff = self._steps_to_sit_out = 0
        else:
            self._backoff = min(max(1, 2 * self._backoff), MAX_BACKOFF_STEPS)
            self._steps_to_sit_out = self._backoff
        return proposed

    def drop_unscheduled(self, proposed: list[Request]) -> None:
        """Forgets the proposals of sequences the scheduler left out of this step (its budget ran
        out), or scheduled without their proposals: they would be stale by the time the sequence is
        scheduled again. Every proposed sequence is then either verified this step or forgotten."""
        for request in proposed:
            # Not scheduled, preempted, or every proposal cut (by the budget or for lack of blocks).
            if request.num_computed_tokens < request.num_tokens or not request.spec_token_ids:
                self.forget(request)

    def forget(self, request: Request) -> None:
        self._num_proposed.pop(request, None)
        request.spec_token_ids = []
        self.kv_cache.trim(request, request.num_tokens)
        # Draft K/V past the last real token was computed from proposals.
        request.num_draft_computed_tokens = min(request.num_draft_computed_tokens, request.num_tokens - 1)

    def accept(self, request: Request, proposed: list[int], target: list[int]) -> list[int]:
        """The tokens a verified step emits for `request`: the accepted proposals and the target's
        token after them. Rolls back the K/V of the rejected positions (their blocks go back to the
        pool once the tokens are appended: `forget`)."""
        accepted = num_accepted(proposed, target)
        num_real = self._num_proposed.pop(request, len(proposed))  # fillers are not proposals
        if num_real:
            rate = min(accepted, num_real) / num_real
            request.spec_acceptance = ACCEPTANCE_DECAY * request.spec_acceptance + (1 - ACCEPTANCE_DECAY) * rate
            self.num_drafts += 1
            self.num_draft_tokens += num_real
            self.num_accepted_tokens += min(accepted, num_real)
            for j in range(num_real):
                self.num_draft_tokens_per_pos[j] += 1
                self.num_accepted_tokens_per_pos[j] += j < accepted
        request.num_computed_tokens -= len(proposed) - accepted
        return target[: accepted + 1]

    def stats(self) -> dict[str, int | list[int]]:
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_num_draft_tokens_per_pos": list(self.num_draft_tokens_per_pos),
            "spec_num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
        }
