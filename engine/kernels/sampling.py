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


# 2**-23 and 2**-24, and the smallest value -log(U) can take (its exact value at U = 1 - 2**-24).
_STEP_23 = tl.constexpr(1.1920928955078125e-07)
_HALF_STEP_23 = tl.constexpr(5.9604644775390625e-08)
_MIN_EXPONENTIAL = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def _open_unit_uniform(bits):
    """uint32 random bits -> U strictly inside (0, 1): the top 23 bits k at the centre of their
    interval, k * 2**-23 + 2**-24. Every such value is exact in float32 (the largest, 1 - 2**-24,
    sits on the float32 grid of [0.5, 1), whose spacing is 2**-24), so none rounds to 0 or 1.
    With 24 bits (k * 2**-24 + 2**-25) the top pattern rounds to exactly 1.0: log(1) = 0 makes the
    noise +inf, and that column wins whatever its probability, in about V / 2**24 of the rows.
    """
    return (bits >> 9).to(tl.float32) * _STEP_23 + _HALF_STEP_23


@triton.jit
def _gumbel_noise(seed, cols):
    """Standard Gumbel noise -log(-log U) for columns `cols` of the row seeded with `seed`."""
    uniform = _open_unit_uniform(tl.randint(seed, cols))
    # -log(U) is Exp(1). Floored at its exact smallest value, so that no log's rounding near 1
    # (the GPU's log is accurate today; a fast-math one may not be) gives 0 (noise +inf) or a
    # negative number (NaN).
    exponential = tl.maximum(-tl.log(uniform), _MIN_EXPONENTIAL)
    return -tl.log(exponential)


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
            # Bounded noise (-2.8 to 16.7): tl.rand can round up to exactly 1.0, hence our own U.
            score = score / temperature + _gumbel_noise(seed, cols)
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
