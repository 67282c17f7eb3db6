"""silu(gate) * up as one kernel, rounding where transformers' gated MLP rounds: silu's result
to the input dtype, then the product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, num_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < num_elements
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + offsets, (activated * up).to(dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    assert gate.shape == up.shape and gate.dtype == up.dtype, (tuple(gate.shape), tuple(up.shape))
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    num_elements = gate.numel()
    if num_elements:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(num_elements, block),)](gate, up, out, num_elements, BLOCK=block, num_warps=4)
    return out
