"""The KV block pool and per-request block bookkeeping, with prefix caching.

Knows block ids and token ids only; the tensors that hold K and V live in the model runner.

A full block is identified by its chain digest: SHA-256 over the parent block's digest and the
block's token ids, so one digest stands for every token from the start of the sequence to the end
of the block. A hit must mean "the same prefix": K/V depend on every earlier token, not only the
block's own. With Python's 64-bit `hash()` an attacker who finds a collision of a parent hash gets
another user's K/V served (vLLM's CVE-2025-25183); a SHA-256 collision is out of reach, so the
cache is keyed by the digest alone.
Blocks no request holds sit in an LRU free queue and keep their contents until reused, so a later
prompt with the same prefix can still hit them; they count as free.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from engine.scheduling.request import Request

BlockKey = bytes  # a block's chain digest
_ROOT_DIGEST = b"sluicegate prefix-cache root"


def chain_digest(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """SHA-256 of (parent digest, the block's token ids as int64): the identity of the whole prefix.

    The parent digest has a fixed length (32 bytes, or the root's), so the encoding is unambiguous.
    """
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        # Free blocks in eviction order: the first is reused first (least recently freed).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockKey, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[int]:
        assert count <= len(self.free_queue), "caller must check num_free_blocks first"
        block_ids = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def acquire(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        # Tail blocks first, so that the tail of a sequence is evicted before its shared prefix.
        for block_id in reversed(block_ids):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    def lookup(self, key: BlockKey) -> int | None:
        return self.cached.get(key)

    def register(self, block_id: int, key: BlockKey) -> None:
        if not self.enable_prefix_caching or self.block_keys[block_id] is not None:
            return
        if key not in self.cached:  # a duplicate computed in parallel stays uncached
            self.cached[key] = block_id
            self.block_keys[block_id] = key

    def _evict(self, block_id: int) -> None:
        key = self.block_keys[block_id]
        if key is not None:
            if self.cached.get(key) == block_id:
                del self.cached[key]
            self.block_keys[block_id] = None


class KVCacheManager:
    """Gives each request the blocks its tokens need; finds and records cached prefix blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Leading cached blocks of a request with nothing computed yet.

        At most (num_tokens - 1) tokens can come from the cache: the last token must run through
        the model to give logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for key in self._block_keys(request, max_blocks):
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give the request blocks for num_new_tokens more tokens (after any cached blocks).

        Returns False, changing nothing, when the pool cannot supply them.
        """
        if not cached_blocks:  # the common case, every decode step of every request: keep it cheap
            total = request.num_computed_tokens + num_new_tokens
            num_new_blocks = -(-total // self.block_size) - len(request.block_ids)
            if num_new_blocks <= 0:
                return True
            if num_new_blocks > self.pool.num_free_blocks:
                return False
            request.block_ids.extend(self.pool.allocate(num_new_blocks))
            return True
        num_cached_tokens = len(cached_blocks) * self.block_size
        total = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(request.block_ids) - len(cached_blocks)
        # Cached blocks nobody holds sit in the free queue: taking them uses up free blocks too.
        num_reclaimed = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if num_new_blocks + num_reclaimed > self.pool.num_free_blocks:
            return False
        if cached_blocks:
            self.pool.acquire(list(cached_blocks))
            request.block_ids.extend(cached_blocks)
            request.num_computed_tokens += num_cached_tokens
        if num_new_blocks > 0:
            request.block_ids.extend(self.pool.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Record every full block whose tokens are computed (or queued) and known to the host, so
        later prompts can reuse it. A token still in flight is not known: its block waits."""
        if not self.enable_prefix_caching or not request.block_ids:  # nothing held (finished, preempted)
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        start = len(request.block_hashes)
        if num_full <= start:
            return
        parent = request.block_hashes[-1] if request.block_hashes else _ROOT_DIGEST
        for index in range(start, num_full):
            parent = chain_digest(parent, request.token_ids_in(index * self.block_size, (index + 1) * self.block_size))
            self.pool.register(request.block_ids[index], parent)
            request.block_hashes.append(parent)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Gives back the blocks past the first num_tokens positions: those only rejected
        speculative tokens used. They hold no full block of known tokens, so no cached prefix."""
        keep = self.blocks_needed(num_tokens)
        if len(request.block_ids) > keep:
            self.pool.release(request.block_ids[keep:])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []

    def _block_keys(self, request: Request, num_blocks: int) -> Iterator[BlockKey]:
        # A generator: the lookup stops at the first miss, and so does the hashing.
        parent = _ROOT_DIGEST
        tokens = request.all_token_ids
        for index in range(num_blocks):
            parent = chain_digest(parent, tokens[index * self.block_size : (index + 1) * self.block_size])
            yield parent
