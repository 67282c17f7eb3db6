"""Token-budget scheduler: continuous batching, chunked prefill, prefix-cache hits, preemption.

Each step gives every running request its next tokens (one for a decode, a chunk for a prompt
still being computed), then fills what is left of the token budget with prompt chunks of waiting
requests, first come first served. When the pool runs out of blocks, the most recently admitted
running request is preempted: its blocks are freed, it goes back to the head of the queue, and it
is recomputed later from its prompt and the tokens it had already generated.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

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
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv_cache.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted_any = True
                if victim is request:
                    break
            else:
                batch.requests.append(request)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                index += 1

        # After a preemption the pool is tight: admitting new work would only thrash.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted_any:
            request = self.waiting[0]
            cached_blocks = self.kv_cache.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            num_cached = len(cached_blocks) * self.kv_cache.block_size
            num_new = min(request.num_tokens - request.num_computed_tokens - num_cached, budget)
            if not self.kv_cache.allocate(request, num_new, cached_blocks):
                break
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_cached
            self.prefix_cache_hit_tokens += num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def mark_computed(self, batch: ScheduledBatch) -> None:
        """After the forward pass: the scheduled tokens now have K/V in the cache."""
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new
            self.kv_cache.cache_computed_blocks(request)

    def finish(self, request: Request) -> None:
        """Remove a request that ended (or was aborted), wherever it is, and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        self.kv_cache.free(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.block_hashes = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request, front=True)
