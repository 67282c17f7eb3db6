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
    """Causal attention of each query row over its sequence's cached context: [T, num_heads, head_dim].

    Decode rows (one query token) go through one batched SDPA; prompt chunks go one sequence at a
    time. On the CPU this is the engine's attention, and per-sequence calls for every decode row
    would dominate a step.
    """
    starts = metadata.query_start_loc_host
    seq_lens = metadata.seq_lens_host
    if starts is None or seq_lens is None:
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
    out = torch.empty_like(query)
    decode_rows = [b for b in range(len(seq_lens)) if starts[b + 1] - starts[b] == 1]
    if decode_rows:
        _decode_attention(query, key_cache, value_cache, metadata, scale, starts, seq_lens, decode_rows, out)
    decode_set = set(decode_rows)
    for b, seq_len in enumerate(seq_lens):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end > q_start and b not in decode_set:
            out[q_start:q_end] = _chunk_attention(
                query[q_start:q_end], key_cache, value_cache, metadata.block_tables[b], seq_len, scale
            )
    return out


def _chunk_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's query rows, the last len(query) positions of its seq_len-token context."""
    q = query.transpose(0, 1)  # [H, q_len, D]
    k = gather_context(key_cache, block_table, seq_len).transpose(0, 1).to(q.dtype)
    v = gather_context(value_cache, block_table, seq_len).transpose(0, 1).to(q.dtype)
    q_len = q.shape[1]
    # Query row j sits at position seq_len - q_len + j and sees keys at positions <= it.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[0] != k.shape[0])
    return o.transpose(0, 1)


def _decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    starts: list[int],
    seq_lens: list[int],
    rows: list[int],
    out: torch.Tensor,
) -> None:
    """All single-token rows at once: gather each context padded to the longest, mask by length."""
    device = query.device
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    lengths = [seq_lens[b] for b in rows]
    max_len = max(lengths)
    num_blocks = -(-max_len // block_size)
    row_index = torch.tensor(rows, device=device)
    token_index = torch.tensor([starts[b] for b in rows], device=device)
    tables = metadata.block_tables[row_index, :num_blocks].long()  # [R, num_blocks]
    k = key_cache[tables].reshape(len(rows), -1, num_kv_heads, head_dim)[:, :max_len]
    v = value_cache[tables].reshape(len(rows), -1, num_kv_heads, head_dim)[:, :max_len]
    group = num_heads // num_kv_heads
    # Grouping the query heads under their kv head avoids expanding K and V for GQA.
    q = query[token_index].view(len(rows), num_kv_heads, group, head_dim)
    mask = torch.arange(max_len, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    o = F.scaled_dot_product_attention(
        q,
        k.transpose(1, 2).to(q.dtype),
        v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    out[token_index] = o.reshape(len(rows), num_heads, head_dim)
