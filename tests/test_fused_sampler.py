"""The fused Gumbel-max sampling kernel and the sampler path that uses it (the Triton backend).

Oracles: a chi-square test against softmax(logits / T), torch.argmax for greedy rows, and the
torch sampler itself for the rows that keep the torch path (top-k/top-p/min-p filters).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

pytest.importorskip("triton", reason="triton is not installed; the Triton kernels cannot be checked")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.kernels import sampling  # noqa: E402
from engine.kernels.sampling import gumbel_argmax  # noqa: E402
from engine.sampling.sampler import Sampler, SamplingRow  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# An explicit pool: on a GPU the engine would otherwise profile and take 90% of the card.
SMALL_TRITON_ENGINE = dict(device=DEVICE, attention_backend="triton", num_kv_blocks=128, max_num_seqs=8)


def _seeds(n: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64, device=DEVICE) * 7919 + 13


def test_draws_follow_the_tempered_softmax():
    torch.manual_seed(0)
    vocab, rows, temperature = 6, 600, 0.7
    logits = (0.7 * torch.randn(vocab)).to(DEVICE, torch.bfloat16)
    batch = logits.repeat(rows, 1)
    tokens = gumbel_argmax(batch, torch.full((rows,), temperature, device=DEVICE), _seeds(rows), vocab)
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    expected = torch.softmax(logits.double().cpu() / temperature, dim=-1) * rows
    assert expected.min() >= 5  # the chi-square approximation holds
    # Imported here: the GPU machine may lack scipy, and the module's other tests need none.
    stats = pytest.importorskip("scipy.stats")
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_greedy_rows_are_the_first_argmax_within_the_vocabulary():
    torch.manual_seed(1)
    logits = torch.randn(4, 5000, device=DEVICE)
    logits[1, 4999] = 100.0  # a padded column past vocab_size: never chosen
    logits[2, [300, 4100]] = 50.0  # a tie across blocks: the lower id wins, as in torch.argmax
    tokens = gumbel_argmax(logits, torch.zeros(4, device=DEVICE), _seeds(4), 4999)
    assert tokens.tolist() == logits[:, :4999].argmax(dim=-1).tolist()
    assert tokens[2].item() == 300


def test_a_rows_draw_depends_on_its_seed_alone():
    torch.manual_seed(2)
    logits = torch.randn(8, 300, device=DEVICE)
    temperatures = torch.full((8,), 1.0, device=DEVICE)
    together = gumbel_argmax(logits, temperatures, _seeds(8), 300)
    alone = [gumbel_argmax(logits[i : i + 1], temperatures[:1], _seeds(1, start=i), 300).item() for i in range(8)]
    assert together.tolist() == alone
    reseeded = gumbel_argmax(logits, temperatures, _seeds(8, start=100), 300)
    assert reseeded.tolist() != together.tolist()  # 8 rows of 300 near-uniform tokens: equal by chance ~1e-20


# Qwen's vocabulary: at this width about V / 2**24 of all rows (0.9%) hold some column whose 32 random
# bits have the top 24 all set, which the first version of the kernel turned into U = 1.0 and noise +inf.
REAL_VOCAB = 151_936
# Found by search: Philox's bits for (seed 192, column 100010) are 0xffffff18 (checked below).
EXTREME_SEED, EXTREME_COLUMN = 192, 100_010


@triton.jit
def _uniform_and_noise_kernel(bits_ptr, seed, cols_ptr, uniform_ptr, noise_ptr, raw_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    bits = tl.load(bits_ptr + i).to(tl.uint32, bitcast=True)
    tl.store(uniform_ptr + i, sampling._open_unit_uniform(bits))
    cols = tl.load(cols_ptr + i)
    tl.store(noise_ptr + i, sampling._gumbel_noise(seed, cols))
    tl.store(raw_ptr + i, tl.randint(seed, cols).to(tl.int32, bitcast=True))


def test_the_uniform_stays_strictly_inside_0_1_at_the_extreme_bit_patterns():
    patterns = [0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0x80000000, 0xFFFFFE00, 0xFFFFFF00, 0xFFFFFF80, 0xFFFFFFFF]
    n = 16
    # Two's-complement int32 views of the uint32 patterns (the kernel bitcasts them back).
    signed = [p - 2**32 if p >= 2**31 else p for p in patterns + [0] * (n - len(patterns))]
    bits = torch.tensor(signed, dtype=torch.int32, device=DEVICE)
    cols = torch.tensor([EXTREME_COLUMN, *range(n - 1)], dtype=torch.int32, device=DEVICE)
    uniform = torch.empty(n, device=DEVICE)
    noise = torch.empty(n, device=DEVICE)
    raw = torch.empty(n, dtype=torch.int32, device=DEVICE)
    _uniform_and_noise_kernel[(1,)](bits, EXTREME_SEED, cols, uniform, noise, raw, N=n)
    u = uniform.cpu().double()[: len(patterns)]
    assert (u > 0).all() and (u < 1).all(), u.tolist()
    # The extremes are the centres of the first and last of 2**23 equal intervals, exactly.
    assert u[0] == 2**-24 and u[-1] == 1 - 2**-24
    assert (u[1:] >= u[:-1]).all()  # monotone in the bits
    # The premise of the next test: this seed's bits at that column are the extreme pattern.
    assert raw[0].item() & 0xFFFFFFFF == 0xFFFFFF18
    g = noise.cpu().double()
    assert torch.isfinite(g).all() and g.max() < 17 and g.min() > -3, g.tolist()


def _near_one_hot(rows: int, top: int) -> torch.Tensor:
    # Every other token 40 nats below the top one (probability ~4e-18 each): with noise bounded
    # to (-2.9, 16.7), the top token must win every draw.
    logits = torch.full((rows, REAL_VOCAB), -40.0, dtype=torch.bfloat16, device=DEVICE)
    logits[:, top] = 0.0
    return logits


def test_a_column_with_the_extreme_random_bits_does_not_win_at_a_real_vocabulary():
    logits = _near_one_hot(1, top=7)
    seeds = torch.tensor([EXTREME_SEED], dtype=torch.int64, device=DEVICE)
    token = gumbel_argmax(logits, torch.ones(1, device=DEVICE), seeds, REAL_VOCAB)
    assert token.item() == 7  # the first version of the kernel returned EXTREME_COLUMN


def test_a_near_one_hot_distribution_never_emits_an_improbable_token():
    # The first version of the kernel sent about V / 2**24 of the rows to a random column: 37 of 4096
    # expected on a GPU (the chance of none, e**-37). The interpreter affords a few rows only; the
    # extreme pattern itself is pinned by the test above.
    rows = 4096 if DEVICE == "cuda" else 2
    logits = _near_one_hot(rows, top=1234)
    tokens = gumbel_argmax(logits, torch.full((rows,), 1.0, device=DEVICE), _seeds(rows, start=1000), REAL_VOCAB)
    assert (tokens == 1234).all(), torch.unique(tokens).tolist()


def _row(params: SamplingParams, seed: int | None = None, position: int = 0) -> SamplingRow:
    return SamplingRow(params, [1, 2, 3], [4] * position, seed)


def test_the_sampler_routes_each_row_and_filtered_rows_match_the_torch_path():
    torch.manual_seed(3)
    vocab = 200
    logits = torch.randn(4, vocab + 8, device=DEVICE)  # + padded embedding columns
    greedy = SamplingParams(temperature=0.0)
    plain = SamplingParams(temperature=0.9, seed=5)
    top_p = SamplingParams(temperature=0.9, top_p=0.8, seed=6)
    penalized = SamplingParams(temperature=0.0, presence_penalty=1.5)
    rows = [_row(greedy), _row(plain, seed=5, position=3), _row(top_p, seed=6), _row(penalized, position=2)]
    fused = Sampler(vocab, fused=True)(logits, rows).token_ids.tolist()

    reference = Sampler(vocab)
    assert fused[0] == logits[0, :vocab].argmax().item()
    # The filtered row went through the torch path with its own generator, as the unfused sampler does.
    assert fused[2] == reference(logits[2:3], [_row(top_p, seed=6)]).token_ids.item()
    # The penalty applies before the fused selection: greedy over penalized logits.
    assert fused[3] == reference(logits[3:4], [_row(penalized, position=2)]).token_ids.item()
    # The plain seeded row gives the same token alone, and again at the same position.
    alone = Sampler(vocab, fused=True)(logits[1:2], [_row(plain, seed=5, position=3)]).token_ids.item()
    assert fused[1] == alone


def test_seeded_sampling_in_the_engine_does_not_depend_on_batch_or_scheduling(model_dir_factory):
    model_dir = str(model_dir_factory("qwen3"))
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    prompts = [[21, 22, 23], [31, 32], [41, 42, 43, 44]]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(model=model_dir, async_scheduling=async_scheduling, **SMALL_TRITON_ENGINE)
        assert llm.engine.runner.sampler.fused
        (alone,) = llm.generate([prompts[0]], params)
        batch = llm.generate(prompts, [params, other, other])
        assert batch[0].outputs[0].token_ids == alone.outputs[0].token_ids
        results.append(alone.outputs[0].token_ids)
    assert results[0] == results[1]


def test_a_kernel_that_cannot_run_leaves_the_torch_path(monkeypatch, model_dir_factory):
    from engine.kernels import sampling

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(sampling, "gumbel_argmax", broken)
    llm = LLM(model=str(model_dir_factory("qwen3")), enforce_eager=True, **SMALL_TRITON_ENGINE)
    assert not llm.engine.runner.sampler.fused
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3
