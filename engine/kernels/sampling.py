"""Temperature sampling (and greedy) as one pass over the logits: the Gumbel-max trick.

argmax_i(x_i / T + G_i), with G_i = -log(-log U_i) standard Gumbel noise, picks i with probability
softmax(x / T)_i, the same distribution as the exponential race of the torch sampler. The torch
path runs about ten full passes over a [batch, vocab] float32 tensor (a copy, the temperature,
softmax, the noise, its logs, the division, argmax); this kernel reads the logits once, in their
own dtype, and draws the noise in registers with Philox.

Each row brings its own 64-bit seed, so a row's draw depends on nothing else in the batch; the
caller derives it from the request's seed and the position of the token being sampled (seeded
requests) or from torch's global generator (the rest). Rows with temperature 0 take the argmax.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr,
    temperature_ptr,
    seed_ptr,
    out_ptr,
    vocab_size,
    stride_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    best_value = float("-inf")
    best_index = 0
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab_size
        score = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
        if temperature > 0.0:
            bits = tl.randint(seed, cols)
            # 24 random bits at the centres of their intervals: U in (0, 1), never 0 or 1, so
            # both logs stay finite (tl.rand can round up to exactly 1.0).
            uniform = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08 + 2.9802322387695312e-08
            score = score / temperature - tl.log(-tl.log(uniform))
            score = tl.where(valid, score, float("-inf"))
        block_best = tl.max(score, axis=0)
        # The first index of the block's best: ties resolve to the lowest id, as torch.argmax does.
        block_index = tl.min(tl.where(score == block_best, cols, vocab_size), axis=0)
        # Strictly greater: an earlier block keeps a tie.
        best_index = tl.where(block_best > best_value, block_index, best_index)
        best_value = tl.maximum(best_value, block_best)
    tl.store(out_ptr + row, best_index.to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """One sampled token id per row of logits [B, >= vocab_size] (any float dtype; the last
    dimension contiguous): temperatures [B] float32 (0: greedy), seeds [B] int64."""
    num_rows = logits.shape[0]
    assert logits.dim() == 2 and logits.stride(1) == 1 and logits.shape[1] >= vocab_size
    assert temperatures.shape == seeds.shape == (num_rows,)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    _gumbel_argmax_kernel[(num_rows,)](
        logits,
        temperatures,
        seeds,
        out,
        vocab_size,
        logits.stride(0),
        BLOCK=min(4096, triton.next_power_of_2(vocab_size)),
        num_warps=8,
    )
    return out


def gumbel_argmax_works(device: torch.device) -> bool:
    """Whether the kernel compiles and runs here (checked once per engine): if not, the sampler keeps
    its torch path rather than failing every step."""
    logits = torch.zeros(2, 64, device=device)
    logits[:, 7] = 1e4  # both rows must pick 7, greedy or sampled
    try:
        tokens = gumbel_argmax(
            logits,
            torch.tensor([0.0, 1.0], device=device),
            torch.tensor([1, 2], dtype=torch.int64, device=device),
            64,
        )
        return tokens.tolist() == [7, 7]
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        logger.warning("The fused sampling kernel failed its check; sampling uses the torch path", exc_info=True)
        return False
