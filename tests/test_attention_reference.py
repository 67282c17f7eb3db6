"""The torch reference paged attention against plain dense causal attention."""

from __future__ import annotations

import random

import torch

from engine.attention import reference
from engine.attention.metadata import AttentionMetadata


def _dense_attention(q, k, v, scale):
    """q [Lq, H, D] at the last Lq positions of k/v [L, Hkv, D]; explicit softmax, no SDPA."""
    num_heads, num_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(num_heads // num_kv, dim=1)
    v = v.repeat_interleave(num_heads // num_kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    length, q_len = k.shape[0], q.shape[0]
    positions = torch.arange(length - q_len, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > positions, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_paged_attention_matches_dense_attention_over_shuffled_blocks():
    torch.manual_seed(0)
    rng = random.Random(0)
    block_size, num_blocks, num_heads, num_kv, head_dim = 4, 64, 4, 2, 8
    # (context length after the step, query length): decode rows, a whole prompt, a chunk after a prefix.
    cases = [(9, 1), (5, 5), (13, 6), (1, 1), (16, 3)]
    key_cache = torch.zeros(num_blocks, block_size, num_kv, head_dim)
    value_cache = torch.zeros_like(key_cache)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, contexts, queries, slots = [], [], [], []
    for seq_len, q_len in cases:
        blocks = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(blocks + [0] * (4 - len(blocks)))
        k, v = torch.randn(seq_len, num_kv, head_dim), torch.randn(seq_len, num_kv, head_dim)
        contexts.append((k, v))
        queries.append(torch.randn(q_len, num_heads, head_dim))
        all_slots = [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        # The prefix is already cached; this step stores the last q_len tokens.
        reference.store_kv(
            k[: seq_len - q_len],
            v[: seq_len - q_len],
            key_cache,
            value_cache,
            torch.tensor(all_slots[: seq_len - q_len], dtype=torch.long),
        )
        slots.extend(all_slots[seq_len - q_len :])
    new_k = torch.cat([k[len(k) - q.shape[0] :] for (k, _), q in zip(contexts, queries)])
    new_v = torch.cat([v[len(v) - q.shape[0] :] for (_, v), q in zip(contexts, queries)])
    reference.store_kv(new_k, new_v, key_cache, value_cache, torch.tensor(slots, dtype=torch.long))

    starts = [0]
    for q in queries:
        starts.append(starts[-1] + q.shape[0])
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([c[0] for c in cases], dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(c[1] for c in cases),
        max_seq_len=max(c[0] for c in cases),
    )
    out = reference.paged_attention(torch.cat(queries), key_cache, value_cache, metadata, scale=0.3)
    for b, ((k, v), q) in enumerate(zip(contexts, queries)):
        expected = _dense_attention(q, k, v, 0.3)
        torch.testing.assert_close(out[starts[b] : starts[b + 1]], expected, rtol=1e-5, atol=1e-5)


def test_store_kv_skips_slot_minus_one():
    key_cache = torch.full((2, 4, 1, 2), 7.0)
    value_cache = torch.full((2, 4, 1, 2), 7.0)
    key = torch.ones(3, 1, 2)
    reference.store_kv(key, key * 2, key_cache, value_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = key_cache.view(-1, 1, 2), value_cache.view(-1, 1, 2)
    assert (flat_k[[0, 5]] == 1).all() and (flat_v[[0, 5]] == 2).all()
    untouched = [i for i in range(8) if i not in (0, 5)]
    assert (flat_k[untouched] == 7).all() and (flat_v[untouched] == 7).all()
