"""The sampler, specified against direct computations (plain loops, numpy, scipy, transformers)."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from engine.sampling.sampler import Sampler, SamplingRow, _row_seed
from engine.sampling.sampling_params import SamplingParams


# numpy oracles in float64 (scipy is imported only by the chi-square tests: the GPU machine may
# lack it, and a module-level import would lose this module's CUDA tests to a collection error).
def np_log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = z - np.max(z, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


NEG_INF = float("-inf")

# Tests that take `device` run on the CPU and, where one is present, on CUDA.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


def make_row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> SamplingRow:
    return SamplingRow(params, list(prompt or []), list(output or []), params.seed)


# ----- direct oracles ----------------------------------------------------------------------------------


def reference_processed(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]):
    """Steps 3-6 written out per token, in float64."""
    x = [float(v) for v in logits]
    for token, bias in p.logit_bias.items():
        x[token] += bias
    if len(output) < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(p.eos_token_ids))
        for token in banned:
            x[token] = NEG_INF
    if p.repetition_penalty != 1.0:
        for token in set(prompt) | set(output):
            x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token, count in Counter(output).items():
        x[token] -= p.frequency_penalty * count + p.presence_penalty
    return x


def reference_probs(x: list[float], p: SamplingParams) -> np.ndarray:
    """Temperature, then min_p, top_k, top_p (each on what the previous left), as probabilities."""
    z = np.asarray(x, dtype=np.float64) / p.temperature
    probs = np_softmax(z)
    z = np.where(probs >= p.min_p * probs.max(), z, -np.inf)
    if p.top_k > 0:
        kth = np.sort(z)[::-1][min(p.top_k, len(z)) - 1]
        z = np.where(z >= kth, z, -np.inf)
    probs = np_softmax(z)
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        num_kept = int(np.searchsorted(cumulative, p.top_p, side="left")) + 1
        kept = np.zeros_like(probs, dtype=bool)
        kept[order[:num_kept]] = True
        probs = np.where(kept, probs, 0.0)
        probs /= probs.sum()
    return probs


def allowed_tokens(logits: list[float], p: SamplingParams) -> set[int]:
    return {int(i) for i in np.flatnonzero(reference_probs(logits, p) > 0)}


# ----- greedy -----------------------------------------------------------------------------------------


def test_greedy_is_argmax_of_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(7)]
    out = Sampler(50)(logits, rows)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.tolist() == [int(np.argmax(r)) for r in logits.numpy()]
    assert out.logprobs is None


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_bias_min_tokens_and_penalties_matches_direct_computation(device: str):
    rng = random.Random(1)
    torch.manual_seed(1)
    vocab, num_rows = 12, 300
    logits = torch.randn(num_rows, vocab) * 2
    rows = []
    for _ in range(num_rows):
        params = SamplingParams(
            temperature=0.0,
            logit_bias={rng.randrange(vocab): rng.uniform(-3, 3) for _ in range(rng.randrange(3))},
            repetition_penalty=rng.choice([1.0, 0.7, 1.3, 2.5]),
            frequency_penalty=rng.choice([0.0, 0.5, -0.4, 1.5]),
            presence_penalty=rng.choice([0.0, 0.8, -1.0]),
            min_tokens=rng.choice([0, 3]),
            max_tokens=None,
            stop_token_ids=[rng.randrange(vocab)],
            eos_token_ids=frozenset({0}),
            ignore_eos=rng.random() < 0.3,
        )
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(6))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(6))]
        rows.append(make_row(params, prompt, output, device))

    got = Sampler(vocab)(logits.to(device), rows).token_ids.tolist()
    expected = [
        int(np.argmax(reference_processed(logits[i].tolist(), r.params, r.prompt_token_ids, r.output_token_ids)))
        for i, r in enumerate(rows)
    ]
    assert got == expected
    # The penalties must actually have mattered for this to say anything.
    assert got != logits.argmax(dim=-1).tolist()


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, 1.8, -0.5, 1.0]])
    # Repetition 2 on token 0 (seen in the prompt): 2.0 -> 1.0, so token 1 (1.8) wins.
    rows = [make_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])]
    assert Sampler(4)(logits, rows).token_ids.tolist() == [1]
    # Frequency 0.5 x 2 occurrences + presence 0.3 on token 0: 2.0 - 1.3 = 0.7; token 1 loses
    # 0.5 + 0.3 = 0.8 -> 1.0; so token 3 (1.0 + 0.2 of bias) wins. Without presence, token 1 would.
    rows = [
        make_row(
            SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3, logit_bias={3: 0.2}),
            output=[0, 0, 1],
        )
    ]
    assert Sampler(4)(logits, rows).token_ids.tolist() == [3]
    # Frequency and presence ignore the prompt.
    rows = [make_row(SamplingParams(temperature=0.0, frequency_penalty=2.0), prompt=[0, 0, 0])]
    assert Sampler(4)(logits, rows).token_ids.tolist() == [0]
    # Bias lifts a negative logit over everything.
    rows = [make_row(SamplingParams(temperature=0.0, logit_bias={2: 3.0}))]
    assert Sampler(4)(logits, rows).token_ids.tolist() == [2]


def test_repetition_penalty_matches_transformers():
    rng = random.Random(2)
    torch.manual_seed(2)
    vocab, num_rows = 10, 200
    logits = torch.randn(num_rows, vocab) * 3
    rows, expected = [], []
    for i in range(num_rows):
        penalty = rng.choice([0.5, 1.2, 1.8, 3.0])
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 5))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(4))]
        rows.append(make_row(SamplingParams(temperature=0.0, repetition_penalty=penalty), prompt, output))
        processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        processed = processor(torch.tensor([prompt + output]), logits[i : i + 1].clone())
        expected.append(int(processed.argmax()))
    got = Sampler(vocab)(logits, rows).token_ids.tolist()
    assert got == expected
    assert got != logits.argmax(dim=-1).tolist()


# ----- random sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p_choices", [(1.0, 0.9, 0.5), (1.0,)], ids=["with_top_p", "without_top_p"])
@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_equal_the_exponential_race_on_directly_computed_probs(
    device: str, top_p_choices: tuple[float, ...]
):
    """Spec 8 exactly: token = argmax(probs / q) with q the V exponentials seeded by the row's (seed, position)."""
    rng = random.Random(3)
    torch.manual_seed(3)
    vocab, num_rows = 16, 200
    logits = torch.randn(num_rows, vocab) * 2
    rows = []
    for i in range(num_rows):
        params = SamplingParams(
            temperature=rng.choice([0.5, 1.0, 1.7]),
            top_k=rng.choice([0, 1, 3, 8]),
            top_p=rng.choice(top_p_choices),
            min_p=rng.choice([0.0, 0.05, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.5]),
            frequency_penalty=rng.choice([0.0, 0.7]),
            logit_bias={rng.randrange(vocab): 2.0},
            seed=1000 + i,
        )
        output = [rng.randrange(vocab) for _ in range(rng.randrange(4))]
        rows.append(make_row(params, prompt=[rng.randrange(vocab)], output=output, device=device))

    got = Sampler(vocab)(logits.to(device), rows).token_ids.tolist()
    for i, row in enumerate(rows):
        p = row.params
        probs = reference_probs(
            reference_processed(logits[i].tolist(), p, row.prompt_token_ids, row.output_token_ids), p
        )
        # The row's noise: vocab exponentials from a generator seeded by (seed, position) alone.
        generator = torch.Generator(device=device).manual_seed(_row_seed(p.seed, len(row.output_token_ids)))
        q = torch.empty(vocab, device=device).exponential_(generator=generator).double().cpu().numpy()
        assert got[i] == int(np.argmax(probs / q)), f"row {i}: {p}"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=4),
        SamplingParams(top_p=0.6),
        SamplingParams(min_p=0.15),
        SamplingParams(temperature=1.5, top_k=6, top_p=0.8, min_p=0.05),
    ],
    ids=["top_k", "top_p", "min_p", "combined"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_filters_never_sample_outside_the_allowed_set(params: SamplingParams, device: str):
    vocab, draws = 32, 4000
    logits = torch.linspace(3.0, -3.0, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(4))]
    allowed = allowed_tokens(logits.tolist(), params)
    assert 3 <= len(allowed) < vocab
    torch.manual_seed(4)
    rows = [make_row(params) for _ in range(draws)]
    sampled = set(Sampler(vocab)(logits.to(device).expand(draws, vocab), rows).token_ids.tolist())
    assert sampled <= allowed
    assert len(sampled) >= 3


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_top_p():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]]).expand(500, 4)
    rows = [make_row(SamplingParams(top_p=0.1)) for _ in range(500)]
    assert set(Sampler(4)(logits, rows).token_ids.tolist()) == {0}


@pytest.mark.parametrize("device", DEVICES)
def test_empirical_frequencies_follow_softmax_at_temperature(device: str):
    vocab, draws, temperature = 8, 20_000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    expected = np_softmax(logits.double().numpy() / temperature) * draws
    torch.manual_seed(5)
    rows = [make_row(SamplingParams(temperature=temperature)) for _ in range(draws)]
    tokens = Sampler(vocab)(logits.to(device).expand(draws, vocab), rows).token_ids
    observed = torch.bincount(tokens.cpu(), minlength=vocab).numpy()
    stats = pytest.importorskip("scipy.stats")
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_seeded_frequencies_follow_softmax_with_top_k():
    """Seeded rows (noise seeded per row) sample the renormalized top-k distribution."""
    vocab, draws = 8, 5000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    params = [SamplingParams(top_k=3, seed=s) for s in range(draws)]
    tokens = Sampler(vocab)(logits.expand(draws, vocab), [make_row(p) for p in params]).token_ids
    observed = torch.bincount(tokens, minlength=vocab).numpy()
    top3 = [4, 7, 0]
    assert set(np.flatnonzero(observed)) <= set(top3)
    expected = np_softmax(logits[top3].double().numpy()) * draws
    stats = pytest.importorskip("scipy.stats")
    assert stats.chisquare(observed[top3], expected).pvalue > 1e-3


def test_mixed_greedy_and_random_rows_in_one_call():
    torch.manual_seed(6)
    vocab = 20
    logits = torch.randn(6, vocab)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.0, top_k=2),  # filters do not matter to a greedy row
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0.0, seed=2),
        SamplingParams(temperature=1.3, top_p=0.5),
    ]
    rows = [make_row(p) for p in params]
    got = Sampler(vocab)(logits, rows).token_ids.tolist()
    argmax = logits.argmax(dim=-1).tolist()
    for i in (0, 2, 4):
        assert got[i] == argmax[i]
    for i in (1, 3, 5):
        assert got[i] in allowed_tokens(logits[i].tolist(), params[i])


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_does_not_depend_on_its_batch(device: str):
    torch.manual_seed(7)
    vocab, steps = 50, 8
    logits = (torch.randn(steps, 5, vocab) * 0.3).to(device)  # flat-ish: the draws differ between steps
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    sampler = Sampler(vocab)

    alone_row = make_row(seeded, device=device)
    alone = [sampler(logits[s, 2:3], [alone_row]).token_ids.item() for s in range(steps)]

    others = [SamplingParams(), SamplingParams(temperature=0.0), seeded, SamplingParams(seed=99)]
    batch_rows = [make_row(p, device=device) for p in [*others, SamplingParams(top_k=3)]]
    in_batch = []
    for s in range(steps):
        torch.manual_seed(100 + s)  # the global generator is in a different state each time
        in_batch.append(sampler(logits[s], batch_rows).token_ids[2].item())

    assert alone == in_batch
    assert len(set(alone)) > 1  # the logits differ from step to step


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_noise_is_a_pure_function_of_seed_and_position(device: str):
    """Speculative decoding samples a position, may throw the token away, and samples the same
    position again later: the token must not depend on how often the position was drawn before."""
    torch.manual_seed(11)
    vocab = 40
    logits = (torch.randn(1, vocab) * 0.3).to(device)  # flat: different noise gives different tokens
    sampler = Sampler(vocab)
    params = SamplingParams(temperature=1.0, seed=42)
    at_position = {
        n: sampler(logits, [make_row(params, output=[3] * n, device=device)]).token_ids.item() for n in range(8)
    }
    # The same positions again, in another order and batched with other seeded rows.
    for n in reversed(range(8)):
        rows = [make_row(SamplingParams(temperature=1.0, seed=7), output=[1] * 5, device=device)]
        rows.append(make_row(params, output=[5] * n, device=device))
        assert sampler(logits.expand(2, vocab), rows).token_ids[1].item() == at_position[n]
    assert len(set(at_position.values())) > 1  # positions draw different noise
    # The output's tokens themselves do not enter the noise, only its length (the position).
    assert sampler(logits, [make_row(params, output=[9, 8, 7], device=device)]).token_ids.item() == at_position[3]
    # Another seed draws other noise.
    others = [
        sampler(
            logits, [make_row(SamplingParams(temperature=1.0, seed=43), output=[3] * n, device=device)]
        ).token_ids.item()
        for n in range(8)
    ]
    assert others != list(at_position.values())


# ----- min_tokens -------------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    vocab = 6
    # EOS (1) and the stop token (2) are the model's favourites.
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 0.5, 0.2]])
    sampler = Sampler(vocab)

    def greedy_pick(output_len: int, ignore_eos: bool = False) -> int:
        params = SamplingParams(
            temperature=0.0,
            min_tokens=3,
            stop_token_ids=[2],
            eos_token_ids=frozenset({1}),
            ignore_eos=ignore_eos,
        )
        return sampler(logits, [make_row(params, output=[0] * output_len)]).token_ids.item()

    assert [greedy_pick(n) for n in range(5)] == [3, 3, 3, 1, 1]
    # ignore_eos leaves EOS alone, but stop token ids stay masked until min_tokens.
    assert [greedy_pick(n, ignore_eos=True) for n in range(4)] == [1, 1, 1, 1]
    logits_stop_first = torch.tensor([[0.0, 4.0, 5.0, 1.0, 0.5, 0.2]])
    params = SamplingParams(
        temperature=0.0, min_tokens=2, stop_token_ids=[2], eos_token_ids=frozenset({1}), ignore_eos=True
    )
    assert sampler(logits_stop_first, [make_row(params)]).token_ids.item() == 1


def test_min_tokens_holds_for_random_sampling():
    vocab, draws = 6, 2000
    logits = torch.tensor([0.0, 3.0, 3.0, 0.0, 0.0, 0.0]).expand(draws, vocab)
    params = SamplingParams(min_tokens=1, stop_token_ids=[2], eos_token_ids=frozenset({1}))
    torch.manual_seed(8)
    tokens = set(Sampler(vocab)(logits, [make_row(params) for _ in range(draws)]).token_ids.tolist())
    assert tokens == {0, 3, 4, 5}


# ----- logprobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_come_from_the_raw_distribution(device: str):
    torch.manual_seed(9)
    vocab = 30
    logits = torch.randn(4, vocab) * 2
    params = [
        SamplingParams(temperature=0.5, top_k=3, logit_bias={0: 50.0}, logprobs=5),
        SamplingParams(temperature=0.0, repetition_penalty=3.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logprobs=20),
    ]
    rows = [make_row(p, prompt=[1, 2, 3], device=device) for p in params]
    out = Sampler(vocab)(logits.to(device), rows)
    raw = np_log_softmax(logits.double().numpy(), axis=-1)
    assert out.logprobs is not None and len(out.logprobs) == 4
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        entry = out.logprobs[i]
        token = out.token_ids[i].item()
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(raw[i, token], abs=1e-5)
        k = params[i].logprobs
        assert len(entry.top_logprobs) == k
        expected_ids = np.argsort(-raw[i], kind="stable")[:k].tolist()
        assert [t for t, _ in entry.top_logprobs] == expected_ids
        values = [v for _, v in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(raw[i, expected_ids].tolist(), abs=1e-5)
        assert all(isinstance(t, int) and isinstance(v, float) for t, v in entry.top_logprobs)
    # The bias made token 0 the choice, yet its logprob is the raw one.
    assert out.token_ids[0].item() == 0
    assert out.logprobs[0].logprob == pytest.approx(raw[0, 0], abs=1e-5)


# ----- padding and dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_padded_vocab_columns_are_never_sampled(device: str):
    vocab, padded, draws = 8, 12, 2000
    logits = torch.zeros(draws, padded)
    logits[:, vocab:] = 100.0  # garbage in the padded embedding rows
    params = [SamplingParams(temperature=0.0, logprobs=3)] + [SamplingParams(temperature=1.0)] * (draws - 1)
    torch.manual_seed(10)
    out = Sampler(vocab)(logits.to(device), [make_row(p, device=device) for p in params])
    assert out.token_ids.max().item() < vocab
    assert len(set(out.token_ids.tolist())) > 1
    assert all(t < vocab for t, _ in out.logprobs[0].top_logprobs)
    assert out.logprobs[0].logprob == pytest.approx(-math.log(vocab), abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_logits_and_the_input_is_left_untouched(dtype: torch.dtype, device: str):
    torch.manual_seed(11)
    logits = (torch.randn(3, 16) * 2).to(device=device, dtype=dtype)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5, logit_bias={3: 1.0}),
        SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.1, frequency_penalty=1.0),
        SamplingParams(temperature=0.0),
    ]
    out = Sampler(16)(logits, [make_row(p, prompt=[1, 2], output=[4, 4], device=device) for p in params])
    assert torch.equal(logits, before)
    assert out.token_ids.shape == (3,)
    assert out.token_ids[2].item() == logits[2].float().argmax().item()
