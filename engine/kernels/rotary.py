"""Rotary position embedding of queries and keys as one kernel, rounding exactly where
transformers' `apply_rotary_pos_emb` rounds: each of its two products, then their sum, in the
input dtype. One program rotates every head of one token, of the queries or of the keys."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    token,
    num_heads,
    stride_t,
    stride_h,
    stride_d,
    stride_ot,
    stride_oh,
    stride_od,
    stride_ct,
    stride_cd,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    mask = (heads[:, None] < num_heads) & dim_ok[None, :]
    dtype = out_ptr.dtype.element_ty
    cos1 = tl.load(cos_ptr + token * stride_ct + dims * stride_cd, mask=dim_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_ct + (dims + HALF) * stride_cd, mask=dim_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * stride_ct + dims * stride_cd, mask=dim_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_ct + (dims + HALF) * stride_cd, mask=dim_ok, other=0.0).to(tl.float32)
    base = x_ptr + token * stride_t + heads[:, None] * stride_h
    x1 = tl.load(base + dims[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + (dims[None, :] + HALF) * stride_d, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) is (-x2, x1): out = x * cos + rotate_half(x) * sin, each product rounded.
    a1 = (x1 * cos1[None, :]).to(dtype).to(tl.float32)
    b1 = (-x2 * sin1[None, :]).to(dtype).to(tl.float32)
    a2 = (x2 * cos2[None, :]).to(dtype).to(tl.float32)
    b2 = (x1 * sin2[None, :]).to(dtype).to(tl.float32)
    out = out_ptr + token * stride_ot + heads[:, None] * stride_oh
    tl.store(out + dims[None, :] * stride_od, (a1 + b1).to(dtype), mask=mask)
    tl.store(out + (dims[None, :] + HALF) * stride_od, (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    num_q_heads,
    num_k_heads,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_qot,
    stride_qoh,
    stride_qod,
    stride_kot,
    stride_koh,
    stride_kod,
    stride_ct,
    stride_cd,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        _rotate(
            q_ptr,
            q_out_ptr,
            cos_ptr,
            sin_ptr,
            token,
            num_q_heads,
            stride_qt,
            stride_qh,
            stride_qd,
            stride_qot,
            stride_qoh,
            stride_qod,
            stride_ct,
            stride_cd,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
        )
    else:
        _rotate(
            k_ptr,
            k_out_ptr,
            cos_ptr,
            sin_ptr,
            token,
            num_k_heads,
            stride_kt,
            stride_kh,
            stride_kd,
            stride_kot,
            stride_koh,
            stride_kod,
            stride_ct,
            stride_cd,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
        )


def apply_rotary(
    q: torch.Tensor,  # [1, num_heads, T, head_dim], any strides
    k: torch.Tensor,  # [1, num_kv_heads, T, head_dim]
    cos: torch.Tensor,  # [1, T, head_dim]
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k), like transformers' apply_rotary_pos_emb with
    unsqueeze_dim=1 on one packed batch."""
    _, num_q_heads, num_tokens, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert q.shape[0] == k.shape[0] == 1 and k.shape[2:] == q.shape[2:], (tuple(q.shape), tuple(k.shape))
    assert cos.shape == sin.shape == (1, num_tokens, head_dim) and cos.stride() == sin.stride()
    assert head_dim % 2 == 0
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens, 2)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        num_q_heads,
        num_k_heads,
        q.stride(2),
        q.stride(1),
        q.stride(3),
        k.stride(2),
        k.stride(1),
        k.stride(3),
        q_out.stride(2),
        q_out.stride(1),
        q_out.stride(3),
        k_out.stride(2),
        k_out.stride(1),
        k_out.stride(3),
        cos.stride(1),
        cos.stride(2),
        HALF=half,
        BLOCK_H=triton.next_power_of_2(max(num_q_heads, num_k_heads)),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q_out, k_out
