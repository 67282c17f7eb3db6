"""The block pool and per-request block bookkeeping, checked directly (no model)."""

from __future__ import annotations

from engine.sampling.sampling_params import SamplingParams
from engine.scheduling.kv_cache import KVCacheManager
from engine.scheduling.request import Request


def _request(tokens: list[int], request_id: str = "r") -> Request:
    return Request(request_id=request_id, prompt_token_ids=tokens, params=SamplingParams())


def _compute_all(manager: KVCacheManager, request: Request) -> None:
    assert manager.allocate(request, request.num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = request.num_tokens
    manager.cache_computed_blocks(request)


def test_allocation_covers_tokens_and_free_returns_every_block():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    request = _request(list(range(9)))
    assert manager.allocate(request, 9)
    assert len(request.block_ids) == 3 and len(set(request.block_ids)) == 3
    assert manager.num_free_blocks == 7
    manager.free(request)
    assert manager.num_free_blocks == 10 and request.block_ids == []


def test_allocation_refuses_without_side_effects_when_pool_is_short():
    manager = KVCacheManager(num_blocks=2, block_size=4)
    request = _request(list(range(12)))
    assert not manager.allocate(request, 12)
    assert manager.num_free_blocks == 2 and request.block_ids == []


def test_prefix_hit_reuses_leading_full_blocks_but_leaves_last_token_to_compute():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    first = _request(list(range(8)), "a")
    _compute_all(manager, first)
    first_blocks = list(first.block_ids)
    manager.free(first)
    assert manager.num_free_blocks == 10  # cached blocks nobody holds count as free

    # Same 8 tokens: at most 7 may come from the cache, so only the first block hits.
    same = _request(list(range(8)), "b")
    assert manager.find_cached_prefix(same) == first_blocks[:1]
    longer = _request(list(range(8)) + [99, 98], "c")
    hits = manager.find_cached_prefix(longer)
    assert hits == first_blocks
    assert manager.allocate(longer, 2, hits)
    assert longer.num_computed_tokens == 8 and longer.block_ids[:2] == first_blocks
    assert manager.num_free_blocks == 7


def test_prefix_hit_requires_the_whole_chain_to_match():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    first = _request([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    _compute_all(manager, first)
    # Second block's tokens equal, first block's differ: no hit at all (the hash chains the parent).
    other = _request([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")
    assert manager.find_cached_prefix(other) == []


def test_shared_blocks_are_reference_counted():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    first = _request(list(range(9)), "a")
    _compute_all(manager, first)
    second = _request(list(range(9)), "b")
    hits = manager.find_cached_prefix(second)
    assert len(hits) == 2
    assert manager.allocate(second, 1, hits)
    assert manager.pool.ref_counts[hits[0]] == 2
    manager.free(first)
    assert manager.pool.ref_counts[hits[0]] == 1 and hits[0] not in manager.pool.free_queue
    manager.free(second)
    assert manager.num_free_blocks == 6


def test_eviction_reuses_least_recently_freed_blocks_and_forgets_their_hashes():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    old = _request([1, 2, 3, 4, 5], "old")
    _compute_all(manager, old)
    manager.free(old)
    # Allocating the whole pool must evict every cached block.
    filler = _request(list(range(100, 108)), "filler")
    assert manager.allocate(filler, 8)
    assert manager.pool.cached == {}
    manager.free(filler)
    assert manager.find_cached_prefix(_request([1, 2, 3, 4, 5], "again")) == []


def test_disabled_prefix_caching_never_hits():
    manager = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    first = _request(list(range(9)), "a")
    _compute_all(manager, first)
    manager.free(first)
    assert manager.find_cached_prefix(_request(list(range(9)), "b")) == []


def test_a_parent_that_only_hashes_alike_never_chains_into_another_prefix():
    """Python's hash() maps the ints t and t + (2**61 - 1) alike, so the blocks X and X' below had
    equal 64-bit chain hashes: a request with X' then Y was served the K/V that request `a` computed
    for Y after X (an attacker can find such collisions among real token ids too: vLLM's
    CVE-2025-25183). Keyed by a SHA-256 digest of the whole prefix, only X' itself hits."""
    manager = KVCacheManager(num_blocks=12, block_size=4)
    x, x_alias, y = [1, 2, 3, 4], [1, 2, 3, 4 + (2**61 - 1)], [5, 6, 7, 8]
    assert hash((0, tuple(x))) == hash((0, tuple(x_alias)))  # the collision this test is about
    a = _request(x + y + [9], "a")
    _compute_all(manager, a)
    c = _request(x_alias + [9], "c")
    _compute_all(manager, c)
    b = _request(x_alias + y + [9], "b")
    assert manager.find_cached_prefix(b) == c.block_ids[:1]


def test_chain_digests_identify_the_whole_prefix():
    from engine.scheduling.kv_cache import chain_digest

    root = b"r" * 32
    assert chain_digest(root, [1, 2]) == chain_digest(root, [1, 2])
    assert len({chain_digest(root, [1, 2]), chain_digest(root, [2, 1]), chain_digest(b"s" * 32, [1, 2])}) == 3
    assert chain_digest(root, [1, 2]) != chain_digest(root, [1, 2 + 2**32])  # ids are not truncated to 32 bits
