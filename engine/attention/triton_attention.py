"""Triton kernels for the paged KV store and paged attention; same interface as reference.py.

KV cache layout, per layer: key_cache and value_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim] (any strides).

Neither function synchronises with the host or allocates memory whose size depends on tensor
values: launch grids come from shapes and the host-side upper bounds metadata.max_query_len and
metadata.max_seq_len, so both can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.attention.metadata import AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (token, group of kv heads). Token indices go to int64 before any multiply so
    # offsets into large caches cannot overflow.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE

    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)

    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :] * stride_vd, mask=mask)
    k_dst = key_cache_ptr + block * stride_kcb + offset * stride_kcs
    v_dst = value_cache_ptr + block * stride_vcb + offset * stride_vcs
    tl.store(
        k_dst + heads[:, None] * stride_kch + dims[None, :] * stride_kcd,
        k.to(key_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_dst + heads[:, None] * stride_vch + dims[None, :] * stride_vcd,
        v.to(value_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; -1 writes nothing
) -> None:
    """Writes each token's key and value into its cache slot (block_id * block_size + offset)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ"
    assert key_cache.shape[2:] == (num_kv_heads, head_dim), "cache heads/head_dim do not match the keys"
    assert value_cache.shape == key_cache.shape, "key and value caches differ in shape"
    assert slot_mapping.shape == (num_tokens,), "slot_mapping needs one slot per token"
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    # About 2K elements per program keeps registers low whatever the head count.
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _store_kv_kernel[grid](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        num_kv_heads,
        *key.stride(),
        *value.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        PAGE_SIZE=key_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    row_pos,
    kv_start,
    last_pos,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    kv_head_off_k,
    kv_head_off_v,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vd,
    qk_scale,
    input_dtype: tl.constexpr,
    CAUSAL: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys kv_start : kv_start + BLOCK_N.

    CAUSAL tiles may hold keys past some rows' positions (and past the sequence end), so they mask
    loads with last_pos and scores with row_pos; the other tiles hold only keys every row sees.
    """
    kv_pos = kv_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    # A tile may span several pages: look up each key's page. Cast before multiplying by the block
    # stride, since block_id * stride can exceed int32 in a large cache.
    if CAUSAL:
        kv_valid = kv_pos <= last_pos
        block_ids = tl.load(block_table_ptr + kv_pos // PAGE_SIZE, mask=kv_valid, other=0).to(tl.int64)
    else:
        block_ids = tl.load(block_table_ptr + kv_pos // PAGE_SIZE).to(tl.int64)
    in_page = kv_pos % PAGE_SIZE
    k_ptrs = (
        k_cache_ptr + kv_head_off_k + (block_ids * stride_kb + in_page * stride_ks)[None, :] + dims[:, None] * stride_kd
    )
    v_ptrs = (
        v_cache_ptr + kv_head_off_v + (block_ids * stride_vb + in_page * stride_vs)[:, None] + dims[None, :] * stride_vd
    )
    if CAUSAL:
        k_t = tl.load(k_ptrs, mask=kv_valid[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=kv_valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM != BLOCK_D:
        k_t = tl.load(k_ptrs, mask=dims[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    else:
        k_t = tl.load(k_ptrs)
        v = tl.load(v_ptrs)

    # Scores in the log2 domain: exp2 is the cheap exponential on the GPU.
    # Operands are rounded to the query's dtype as the reference does (then widened again where
    # UPCAST_DOT asks for it; q already is).
    k_t = k_t.to(input_dtype).to(q.dtype)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
    if CAUSAL:
        s = tl.where(kv_pos[None, :] <= row_pos[:, None], s, float("-inf"))
    # Every row has seen at least one key by the end of its first tile (key 0 when it starts the
    # loop, an earlier full tile otherwise), so m_new is finite and exp2 never sees -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # P is rounded to the input dtype so the second product runs on the tensor cores too.
    p = p.to(input_dtype).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v.to(input_dtype).to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Integers that change from step to step are not specialized (Triton would otherwise compile a
# new version when one becomes 1 or a multiple of 16); the block-table stride is instead always a
# multiple of 16 (the model runner rounds table widths up).
@triton.jit(do_not_specialize=["num_splits"])
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    partial_out_ptr,  # SPLIT_KV only: [T, num_heads, num_splits, HEAD_DIM] fp32
    partial_lse_ptr,  # SPLIT_KV only: [T, num_heads, num_splits] fp32, log2 domain
    qk_scale,  # softmax scale * log2(e)
    num_splits,  # key ranges per (query block, kv head, sequence); 1 unless SPLIT_KV
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_M // GROUP_PAD query tokens x GROUP_PAD heads
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # run the products in fp32 (on rounded operands); see paged_attention
    SPLIT_KV: tl.constexpr,  # write per-split partial results for _merge_splits_kernel
):
    # Query blocks run last-first: the later blocks of a long prefill attend to the most keys, and
    # starting them first evens out the tail of the launch.
    q_block = tl.num_programs(0) // num_splits - 1 - tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    q_first = q_block * BLOCK_Q
    if q_first >= q_len:  # the grid is sized by the upper bound max_query_len
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens cached before this step's queries

    # Row m of the tile is query token q_first + m // GROUP_PAD, head kv_head * GROUP + m % GROUP_PAD:
    # packing the heads that share a kv head into M lets decode (one token) still fill a tensor-core
    # tile and read each key once for the whole group.
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    row_valid = (q_idx < q_len) & (head_in_group < GROUP)
    head = kv_head * GROUP + head_in_group
    token = (q_start + q_idx).to(tl.int64)
    # Padding rows take the position of the last real row so they see a non-empty key range and
    # stay finite; they are never stored.
    row_pos = context_len + tl.minimum(q_idx, q_len - 1)

    dims = tl.arange(0, BLOCK_D)
    q_mask = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off_k = kv_head.to(tl.int64) * stride_kh
    kv_head_off_v = kv_head.to(tl.int64) * stride_vh
    first_pos = context_len + q_first  # position of this block's first query token
    last_pos = context_len + tl.minimum(q_first + BLOCK_Q, q_len) - 1
    # Keys 0..first_pos are visible to every row: whole tiles of them need no masks at all.
    num_full_tiles = (first_pos + 1) // BLOCK_N
    num_tiles = tl.cdiv(last_pos + 1, BLOCK_N)
    if SPLIT_KV:
        # Each split takes an equal share of this sequence's own tiles (not of the max_seq_len
        # bound), so short sequences in a batch sized for long ones still spread their work.
        tiles_per_split = tl.cdiv(num_tiles, num_splits)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles
    for tile in range(tile_lo, tl.minimum(num_full_tiles, tile_hi)):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            row_pos,
            tile * BLOCK_N,
            last_pos,
            k_cache_ptr,
            v_cache_ptr,
            block_table_ptr,
            kv_head_off_k,
            kv_head_off_v,
            stride_kb,
            stride_ks,
            stride_kd,
            stride_vb,
            stride_vs,
            stride_vd,
            qk_scale,
            q_ptr.dtype.element_ty,
            False,
            PAGE_SIZE,
            HEAD_DIM,
            BLOCK_N,
            BLOCK_D,
            DOT_PRECISION,
        )
    # The remaining tiles reach the diagonal (and the sequence end): mask per row.
    for tile in range(tl.maximum(num_full_tiles, tile_lo), tile_hi):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            row_pos,
            tile * BLOCK_N,
            last_pos,
            k_cache_ptr,
            v_cache_ptr,
            block_table_ptr,
            kv_head_off_k,
            kv_head_off_v,
            stride_kb,
            stride_ks,
            stride_kd,
            stride_vb,
            stride_vs,
            stride_vd,
            qk_scale,
            q_ptr.dtype.element_ty,
            True,
            PAGE_SIZE,
            HEAD_DIM,
            BLOCK_N,
            BLOCK_D,
            DOT_PRECISION,
        )

    # l_i is 0 only for a row with no keys: an empty split, or seq_len 0 (e.g. CUDA-graph padding),
    # which gets zeros.
    has_keys = l_i > 0.0
    l_i = tl.where(has_keys, l_i, 1.0)
    out = acc / l_i[:, None]
    if SPLIT_KV:
        # Every split of a real row writes, empty ones with weight exp2(-inf) = 0, so the merge
        # never reads an unwritten partial.
        partial = (token * (tl.num_programs(1) * GROUP) + head) * num_splits + split
        lse = tl.where(has_keys, m_i + tl.log2(l_i), float("-inf"))
        tl.store(partial_lse_ptr + partial, lse, mask=row_valid)
        tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], out, mask=q_mask)
        return
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _merge_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    query_start_loc_ptr,
    num_seqs,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # the most splits there can be (_MAX_KV_SPLITS), whatever this step's count
):
    # One program per (token, query head): a softmax-weighted sum of the splits' partial outputs.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_seqs):  # padding rows past the batch: no partials
        return
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_valid = splits < num_splits
    partial = (token * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(partial_lse_ptr + partial, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # All splits empty only when the sequence has no keys at all: weights 0, output 0.
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    partial_out = tl.load(
        partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :],
        mask=split_valid[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    total = tl.sum(weights, axis=0)
    out = tl.sum(partial_out * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + dims * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


_MAX_KV_SPLITS = 64


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small count, so that tests exercise the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_kv_splits(
    num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, block_n: int, device: torch.device
) -> int:
    """How many key ranges each decode program's work is cut into (flash-decoding); 1: no split.

    Decode runs one program per (sequence, kv head); when those are too few to keep every SM
    streaming keys, long contexts are split and the partial results merged by a second kernel.
    Depends on host integers only, so a captured graph replays with the same split.
    """
    if max_query_len != 1:
        return 1  # prefill blocks already give the grid enough programs
    programs = num_seqs * num_kv_heads
    target = 2 * _num_sms(device)  # about two resident programs per SM
    if programs >= target:
        return 1
    # At least ~4 key tiles per split, so the merge stays small next to the key reads.
    max_splits = triton.cdiv(triton.cdiv(max_seq_len, block_n), 4)
    return max(1, min(triton.cdiv(target, programs), max_splits, _MAX_KV_SPLITS))


def _new_output(query: torch.Tensor) -> torch.Tensor:
    # Contiguous whatever the query's strides: the caller reshapes it to [T, hidden]. A function of
    # its own so tests can hand the kernel a poisoned buffer.
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


class _LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _launch_config(block_d: int, group_pad: int, max_query_len: int, dtype: torch.dtype) -> _LaunchConfig:
    """Fixed tile heuristic (no autotuning: keeps CUDA-graph capture and interpreter runs simple).

    Picked from a sweep on an H200 (benchmarks/attention_kernels.py --sweep) with bf16, head_dim
    128. Shared memory per pipeline stage is about 2 * block_n * block_d * itemsize (a K and a V
    tile) on top of the Q tile; every choice fits the H100's 227 KB, fp32 and head_dim 256
    included (the 128 x 64 head_dim-256 tile is the largest, at about 200 KB).
    """
    wide = dtype == torch.float32  # fp32 tiles take twice the bytes and run off the tensor cores
    if max_query_len <= 1:
        # Decode: one token x the head group per program, memory-bound; the tile is as small as
        # tl.dot allows. 64-key tiles with 2 stages read fastest (~3.5 TB/s on the H200).
        block_m = max(16, group_pad)
        block_n = 32 if wide and block_d >= 256 else 64
        return _LaunchConfig(block_m, block_n, num_warps=4, num_stages=2)
    rows = triton.next_power_of_2(max_query_len) * group_pad  # no point in tiles taller than this
    if block_d >= 256 and not wide and rows >= 128:
        # head_dim 256: 128 x 64 tiles with 8 warps ran ~285 TFLOP/s against ~228 for 64 x 32
        # (about 200 KB of shared memory, under the limit on the H100 as on the H200).
        return _LaunchConfig(128, 64, num_warps=8, num_stages=2)
    # Prefill at head_dim <= 128: 64 rows x 64 keys with 4 warps beat 128-row tiles (~280 vs
    # ~225 TFLOP/s); 8 warps on 64-row tiles halved the speed at head_dim 256.
    block_m = max(16, min(64, rows))
    block_n = 32 if wide or block_d >= 256 else 64
    return _LaunchConfig(block_m, block_n, num_warps=4, num_stages=2)


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each query row over its sequence's cached context: [T, num_heads, head_dim].

    One kernel serves decode rows and prefill chunks alike. The grid is
    (query blocks of the longest allowed query, kv heads, sequences); programs beyond a sequence's
    real query length return at once. Decode-only batches with too few (sequence, kv head) pairs to
    fill the GPU split each context into key ranges and merge them with a second small kernel.
    Rows of `query` past query_start_loc[-1] (batch padding) are left unwritten.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    assert key_cache.shape[3] == head_dim, "cache head_dim differs from the query's"
    assert value_cache.shape == key_cache.shape, "key and value caches differ in shape"
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads is not a multiple of {num_kv_heads}"
    assert metadata.block_tables.dtype == torch.int32, "block_tables must be int32"
    out = _new_output(query)
    num_seqs = metadata.block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0 or metadata.max_query_len <= 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    config = _launch_config(block_d, group_pad, metadata.max_query_len, query.dtype)
    num_q_blocks = triton.cdiv(metadata.max_query_len, config.block_m // group_pad)
    num_splits = _num_kv_splits(
        num_seqs, num_kv_heads, metadata.max_query_len, metadata.max_seq_len, config.block_n, query.device
    )
    grid = (num_q_blocks * num_splits, num_kv_heads, num_seqs)
    if num_splits > 1:
        # Sized from shapes and host ints only, so allocation is CUDA-graph safe.
        partial_out = torch.empty(
            (num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        partial_lse = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        partial_out = partial_lse = out  # unused: SPLIT_KV compiles their stores away
    # Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits in tl.dot (seen
    # with triton 3.9), so there the products take fp32 copies of the bf16-rounded operands.
    upcast_dot = query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    _paged_attention_kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.query_start_loc,
        metadata.seq_lens,
        partial_out,
        partial_lse,
        scale * _LOG2E,
        num_splits,
        *query.stride(),
        *out.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        metadata.block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        PAGE_SIZE=key_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        # fp32 products would otherwise round their inputs to tf32 on the tensor cores.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot,
        SPLIT_KV=num_splits > 1,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            partial_out,
            partial_lse,
            metadata.query_start_loc,
            num_seqs,
            num_splits,
            *out.stride(),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            # Fixed, not the step's count: the split count follows each eager step's longest
            # sequence, and a tile sized to it would compile a new merge kernel as contexts grow.
            BLOCK_S=_MAX_KV_SPLITS,
            num_warps=4,
        )
    return out
