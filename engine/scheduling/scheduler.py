"""Token-budget scheduler: continuous batching, chunked prefill, prefix-cache hits, preemption.

Each step gives every running request its next tokens (one for a decode, a chunk for a prompt
still being computed), then fills what is left of the token budget with prompt chunks of waiting
requests, first come first served. When the pool runs out of blocks, the most recently admitted
running request is preempted: its blocks are freed, it goes back to the head of the queue, and it
is recomputed later from its prompt and the tokens it had already generated.

A decoding request with speculative proposals (`Request.spec_token_ids`) schedules 1 + k tokens:
its last token and the proposals after it, which the token budget and the blocks count. When the
budget is short, the proposals are cut to fit; when the blocks are, they are dropped rather than
preempting anyone for them. The engine rolls back the rejected ones after the step.

Scheduled tokens count as computed at once: the device runs steps in order, so any later step
reads their K/V after it is written. That lets the engine schedule step N+1 while step N still
runs, with N's sampled tokens in flight (`Request.num_inflight_tokens`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.scheduling.kv_cache import KVCacheManager
from engine.scheduling.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # each request's first position in this step

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0

    def add(self, request: Request, front: bool = False) -> None:
        request.status = RequestStatus.WAITING
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted_any = False

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_scheduled_target - request.num_computed_tokens, budget)
            if num_new == 0 or _last_token_in_flight(request):
                index += 1  # nothing to compute until its in-flight token arrives (and maybe ends it)
                continue
            if request.spec_token_ids:
                num_speculative = min(len(request.spec_token_ids), budget - num_new)
                del request.spec_token_ids[num_speculative:]
                if num_speculative and self.kv_cache.allocate(request, num_new + num_speculative):
                    num_new += num_speculative
                else:
                    request.spec_token_ids = []
            while not self.kv_cache.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted_any = True
                if victim is request:
                    break
            else:
                self._add_to_batch(batch, request, num_new)
                budget -= num_new
                index += 1

        # After a preemption the pool is tight: admitting new work would only thrash.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted_any:
            request = self.waiting[0]
            # A preempted request waits for its in-flight token; admissions stop after a preemption.
            assert request.num_inflight_tokens == 0, request.request_id
            # A request that wants prompt logprobs computes its whole prompt: cached blocks have no logits.
            use_cache = request.num_computed_tokens == 0 and request.params.prompt_logprobs is None
            cached_blocks = self.kv_cache.find_cached_prefix(request) if use_cache else []
            num_cached = len(cached_blocks) * self.kv_cache.block_size
            num_new = min(request.num_tokens - request.num_computed_tokens - num_cached, budget)
            if not self.kv_cache.allocate(request, num_new, cached_blocks):
                break
            self.waiting.popleft()
            # A draft model's K/V of cached blocks was computed along with the target's (or, if the
            # sequence that computed them ended first, is stale: which only costs acceptance).
            request.num_draft_computed_tokens = request.num_computed_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_cached
            self.prefix_cache_hit_tokens += num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_to_batch(batch, request, num_new)
            budget -= num_new
        return batch

    @staticmethod
    def _add_to_batch(batch: ScheduledBatch, request: Request, num_new: int) -> None:
        batch.requests.append(request)
        batch.num_new_tokens.append(num_new)
        batch.starts.append(request.num_computed_tokens)
        request.num_computed_tokens += num_new

    def finish(self, request: Request) -> None:
        """Remove a request that ended (or was aborted), wherever it is, and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        self.kv_cache.free(request)

    def cache_computed_blocks(self, batch: ScheduledBatch) -> None:
        """Offer the blocks this step completes to the prefix cache. Called once the step is queued
        on the device, so only later steps (which run after it) can hit them."""
        if not self.kv_cache.enable_prefix_caching:
            return
        block_size = self.kv_cache.block_size
        for request, start, num_new in zip(batch.requests, batch.starts, batch.num_new_tokens):
            # Inlined early exit (most decodes complete no block): full computed blocks not yet
            # recorded, counting blocks that came from the prefix cache at admission.
            if (start + num_new) // block_size > len(request.block_hashes):
                self.kv_cache.cache_computed_blocks(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.num_draft_computed_tokens = 0
        request.spec_token_ids = []
        request.block_hashes = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request, front=True)


def _last_token_in_flight(request: Request) -> bool:
    """The token being sampled is the request's last (max_tokens): computing it would be wasted."""
    max_tokens = request.params.max_tokens
    if request.num_inflight_tokens == 0 or max_tokens is None:
        return False
    return len(request.output_token_ids) + request.num_inflight_tokens >= max_tokens
