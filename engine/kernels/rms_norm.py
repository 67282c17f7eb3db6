"""RMSNorm as one kernel, rounding exactly where transformers' Llama-family RMSNorm rounds:
the normalized row is rounded to the input dtype, then multiplied by the weight."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# The row count follows the step's token count: specialized, it would compile a version for 1 row
# and one for multiples of 16.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    num_rows,
    num_cols,
    stride_x,
    stride_out,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=1) / num_cols
    normed = (x * tl.rsqrt(variance + eps)[:, None]).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=cols < num_cols, other=0.0)
    out = weight.to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalize(x) over the last dimension, in the dtype torch would give that product."""
    num_cols = x.shape[-1]
    assert weight.shape == (num_cols,), f"weight {tuple(weight.shape)} does not match rows of {num_cols}"
    rows = x.reshape(-1, num_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    num_rows = rows.shape[0]
    if num_rows == 0:
        return out.view(x.shape)
    block_cols = triton.next_power_of_2(num_cols)
    # About 4K elements per program: several short rows (per-head q/k norms) or one long one. Not
    # shrunk for fewer rows, which would compile another version for small steps (1, 2, 3-4 tokens).
    block_rows = max(1, min(64, 4096 // block_cols))
    _rms_norm_kernel[(triton.cdiv(num_rows, block_rows),)](
        rows,
        weight,
        out,
        num_rows,
        num_cols,
        rows.stride(0),
        out.stride(0),
        eps,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=4 if block_cols * block_rows <= 4096 else 8,
    )
    return out.view(x.shape)
