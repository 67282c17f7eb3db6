"""Torch reference for the paged KV store and paged attention: runs anywhere, the oracle in tests.

KV cache layout, per layer: key_cache and value_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata


def store_kv(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]; -1 writes nothing
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key[keep].to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value[keep].to(value_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len cached tokens of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each query row over its sequence's cached context: [T, num_heads, head_dim]."""
    starts = metadata.query_start_loc_host
    seq_lens = metadata.seq_lens_host
    if starts is None or seq_lens is None:
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    out = torch.empty_like(query)
    for b, seq_len in enumerate(seq_lens):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end == q_start:
            continue
        q = query[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        k = gather_context(key_cache, metadata.block_tables[b], seq_len).transpose(0, 1).to(q.dtype)
        v = gather_context(value_cache, metadata.block_tables[b], seq_len).transpose(0, 1).to(q.dtype)
        q_len = q_end - q_start
        # Query row j sits at position seq_len - q_len + j and sees keys at positions <= it.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads)
        out[q_start:q_end] = o.transpose(0, 1)
    return out
