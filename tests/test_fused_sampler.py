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
from scipy.stats import chisquare  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.kernels.sampling import gumbel_argmax  # noqa: E402
from engine.sampler import Sampler, SamplingRow, make_generator  # noqa: E402

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
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


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


def _row(params: SamplingParams, seed: int | None = None, position: int = 0) -> SamplingRow:
    generator = make_generator(seed, DEVICE) if seed is not None else None
    return SamplingRow(params, [1, 2, 3], [4] * position, generator)


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
