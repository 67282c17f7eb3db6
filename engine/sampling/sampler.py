"""Batched logits processing and sampling on the device.

Per-request parameters become tensors once per step, so the math is a handful of batched kernels
whatever the batch holds. The only per-row Python work is building those tensors and drawing the
noise of seeded rows from a generator seeded for that row and position alone.

A seeded row's noise is a pure function of (seed, position of the token): the same text whatever
else shares the batch, and the same token at a position however it was reached. Speculative
decoding relies on that: it samples positions p..p+k of a sequence in one step, and a position
whose proposal is rejected is sampled again in a later step, with the same noise.

Order of operations, per row (each stage is skipped when no row in the batch uses it):
  raw logits (fp32, columns >= vocab_size dropped) -> logprobs of the raw distribution
  -> logit_bias -> bad words -> min_tokens masking -> repetition penalty -> frequency/presence penalties
  -> grammar mask (constrained rows only) -> greedy: argmax | random: / temperature -> min_p -> top_k
  -> top_p -> exponential race.
Each filter acts on the distribution the previous filters left (renormalized), as transformers'
warpers and vLLM do.

With the Triton backend (fused=True), greedy rows and rows without filters skip the last stages:
one kernel samples them by Gumbel-max (the same distribution as the exponential race), with
Philox noise seeded per row by (seed, position of the token), as the torch path seeds its
generator. A seed therefore reproduces the same text on the same backend; the torch and Triton
backends draw different (equally distributed) noise for the same seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.execution.transfers import host_to_device
from engine.outputs import TokenLogprob
from engine.sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.sampling.structured_outputs import SequenceGrammar


@dataclass
class SamplingRow:
    """One row of logits to sample, built by the engine."""

    params: SamplingParams
    prompt_token_ids: list[int]
    # The tokens this sequence generated before the one sampled now (for speculative rows, the
    # accepted output plus the proposals before this position); its length is the token's position.
    output_token_ids: list[int]
    # The sequence's seed (params.seed + sample index) when params.seed is set, else None.
    seed: int | None = None
    # The sequence's grammar matcher when its output is constrained (params.structured_outputs).
    grammar: SequenceGrammar | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on the logits' device
    # Still on the device, so that sampling never waits for the GPU: per row the chosen id, its
    # logprob, then the top-k ids and their logprobs (float64); None when no row asked for logprobs.
    packed_logprobs: torch.Tensor | None
    num_logprobs: list[int | None]  # per row the k it asked for; None: no logprobs

    @property
    def logprobs(self) -> list[TokenLogprob | None] | None:
        """One entry per row when any row asked for logprobs (rows that did not hold None); reads
        them from the device."""
        if self.packed_logprobs is None:
            return None
        return unpack_logprobs(self.packed_logprobs.tolist(), self.num_logprobs)


class Sampler:
    """fused=True (the Triton backend) selects the tokens of greedy rows and of rows without top-k,
    top-p or min-p filters with one Triton kernel (engine/kernels/sampling.py), reading the logits
    once; without processors or logprobs in the batch it reads them in the model's dtype, with no
    float32 copy. Filtered rows take the torch path."""

    def __init__(self, vocab_size: int, fused: bool = False) -> None:
        assert vocab_size > 0
        self.vocab_size = vocab_size
        self.fused = fused
        # Reseeded for every seeded row (`_exponential_noise`); one per device the logits live on.
        self._seeded_generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        assert logits.shape[1] >= self.vocab_size, (logits.shape[1], self.vocab_size)
        device = logits.device
        num_rows, vocab = logits.shape[0], self.vocab_size
        params = [row.params for row in rows]
        num_logprobs = [p.logprobs for p in params]
        if self.fused and not any(k is not None for k in num_logprobs) and not _uses_processors(rows):
            return SamplerOutput(self._select_fused(logits, rows), None, num_logprobs)
        # Padded embedding columns can never be sampled: dropping them is the same as masking them
        # to -inf, and keeps every later tensor (and each seeded row's noise draw) vocab_size wide.
        # A fresh fp32 copy, because the stages below work in place and must not touch the caller's logits.
        processed = torch.empty((num_rows, vocab), dtype=torch.float32, device=device)
        processed.copy_(logits[:, :vocab])

        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(processed, dim=-1)

        self._apply_logit_bias(processed, rows)
        self._apply_bad_words(processed, rows)
        self._apply_min_tokens(processed, rows)
        self._apply_penalties(processed, rows)
        # Last of the processors, so that greedy and random selection (and every filter) only ever
        # see tokens the grammar allows; the logprobs above stay those of the raw distribution.
        self._apply_grammars(processed, rows)

        greedy = [p.greedy for p in params]
        if self.fused:
            token_ids = self._select_fused(processed, rows)
        elif all(greedy):
            token_ids = processed.argmax(dim=-1)
        else:
            token_ids = self._sample_random(processed, rows, greedy)

        packed = None
        if raw_logprobs is not None:
            packed = _pack_logprobs(raw_logprobs, token_ids, params)
        return SamplerOutput(token_ids=token_ids, packed_logprobs=packed, num_logprobs=num_logprobs)

    def _select_fused(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The Triton kernel for every row, then the torch path over the rows that need filters."""
        from engine.kernels.sampling import gumbel_argmax

        device = logits.device
        params = [row.params for row in rows]
        # Fresh seeds from torch's global generator (so torch.manual_seed governs them), replaced by
        # a function of (seed, position) in seeded rows.
        seeds = torch.randint(0, 1 << 62, (len(rows),), dtype=torch.int64).tolist()
        for i, row in enumerate(rows):
            if row.seed is not None:
                # The position of the token sampled now: the draw depends on nothing else.
                seeds[i] = _row_seed(row.seed, len(row.output_token_ids))
        temperatures = [0.0 if p.greedy else p.temperature for p in params]
        token_ids = gumbel_argmax(
            logits,
            _to_device(temperatures, torch.float32, device),
            _to_device(seeds, torch.int64, device),
            self.vocab_size,
        )
        filtered = [i for i, p in enumerate(params) if _needs_filters(p)]
        if filtered:
            index = _to_device(filtered, torch.int64, device)
            subset = logits.index_select(0, index)[:, : self.vocab_size].float()
            sampled = self._sample_random(subset, [rows[i] for i in filtered], [False] * len(filtered))
            token_ids.index_copy_(0, index, sampled)
        return token_ids

    # ----- logits processors (3-6) -------------------------------------------------------------------

    def _apply_logit_bias(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        row_idx: list[int] = []
        token_idx: list[int] = []
        values: list[float] = []
        for i, row in enumerate(rows):
            for token_id, bias in (row.params.logit_bias or {}).items():
                # Ids outside the vocabulary cannot be sampled; an out-of-range index would be a device
                # assert on CUDA, so they are dropped here rather than trusted.
                if 0 <= token_id < self.vocab_size:
                    row_idx.append(i)
                    token_idx.append(token_id)
                    values.append(bias)
        if not row_idx:
            return
        index = _to_device([row_idx, token_idx], torch.int64, logits.device)
        logits.index_put_((index[0], index[1]), _to_device(values, torch.float32, logits.device), accumulate=True)

    def _apply_bad_words(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Bans the token that would complete a bad word: its last token, once the output ends with the rest."""
        row_idx: list[int] = []
        token_idx: list[int] = []
        for i, row in enumerate(rows):
            output = row.output_token_ids
            for word in row.params.bad_words_token_ids or ():
                prefix_len = len(word) - 1
                if prefix_len == 0 or (len(output) >= prefix_len and output[-prefix_len:] == word[:-1]):
                    if 0 <= word[-1] < self.vocab_size:
                        row_idx.append(i)
                        token_idx.append(word[-1])
        if not row_idx:
            return
        index = _to_device([row_idx, token_idx], torch.int64, logits.device)
        logits[index[0], index[1]] = float("-inf")

    def _apply_min_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        row_idx: list[int] = []
        token_idx: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            # A constrained output ends when its grammar is complete: the grammar then allows only
            # EOS, and banning EOS too would leave no token at all. (Not while it waits for a
            # reasoning model's thinking to end: that part is free text.)
            if len(row.output_token_ids) >= p.min_tokens or (row.grammar is not None and row.grammar.masks_next_token):
                continue
            banned = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                banned.update(p.eos_token_ids)
            for token_id in banned:
                if 0 <= token_id < self.vocab_size:
                    row_idx.append(i)
                    token_idx.append(token_id)
        if not row_idx:
            return
        index = _to_device([row_idx, token_idx], torch.int64, logits.device)
        logits[index[0], index[1]] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        params = [row.params for row in rows]
        use_repetition = any(p.repetition_penalty != 1.0 for p in params)
        use_additive = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
        if not (use_repetition or use_additive):
            return
        device = logits.device
        vocab = logits.shape[1]

        # Output-token counts, shared by both penalties. Rows that use neither contribute no ids, so
        # their padded row is all sink.
        output_ids = [
            row.output_token_ids
            if (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)
            else []
            for row, p in zip(rows, params, strict=True)
        ]
        output_counts = _token_counts(output_ids, vocab, device)
        if use_repetition:
            prompt_ids = [
                row.prompt_token_ids if p.repetition_penalty != 1.0 else [] for row, p in zip(rows, params, strict=True)
            ]
            seen = (_token_counts(prompt_ids, vocab, device) > 0) | (output_counts > 0)
            penalty = _to_device([p.repetition_penalty for p in params], torch.float32, device).unsqueeze(1)
            # transformers' rule: shrink positive logits, push negative ones further down.
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(seen, penalized, logits))

        if use_additive:
            coeffs = _to_device([[p.frequency_penalty, p.presence_penalty] for p in params], torch.float32, device)
            frequency, presence = coeffs[:, 0:1], coeffs[:, 1:2]
            logits.sub_(frequency * output_counts + presence * (output_counts > 0).float())

    def _apply_grammars(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
        if not constrained:
            return
        grammars = [rows[i].grammar for i in constrained]
        # One manager per engine, so one call fills and applies the masks of all constrained rows.
        grammars[0].manager.apply_bitmask(logits, constrained, grammars)

    # ----- random sampling (7-8) ----------------------------------------------------------------------

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        device = logits.device
        params = [row.params for row in rows]
        # Greedy rows still ride through the batched math with neutral settings; their token is the
        # argmax taken before temperature and filters, and replaces the random one at the end.
        greedy_tokens = logits.argmax(dim=-1) if any(greedy) else None

        settings = _to_device(
            [
                [
                    1.0 if g else p.temperature,
                    0.0 if g else p.min_p,
                    0.0 if g or p.top_k <= 0 else float(min(p.top_k, self.vocab_size)),
                ]
                for p, g in zip(params, greedy, strict=True)
            ],
            torch.float32,
            device,
        )
        temperature, min_p, top_k = (settings[:, j : j + 1] for j in range(3))
        use_min_p = any(not g and p.min_p > 0.0 for p, g in zip(params, greedy, strict=True))
        use_top_k = any(not g and p.top_k > 0 for p, g in zip(params, greedy, strict=True))
        use_top_p = any(not g and p.top_p < 1.0 for p, g in zip(params, greedy, strict=True))

        logits.div_(temperature)

        if use_min_p:
            probs = torch.softmax(logits, dim=-1)
            threshold = min_p * probs.amax(dim=-1, keepdim=True)
            logits.masked_fill_(probs < threshold, float("-inf"))

        if use_top_k and not use_top_p:
            # top_k alone needs only each row's k-th value, which a partial topk finds faster than a sort.
            max_k = max(p.top_k for p, g in zip(params, greedy, strict=True) if not g)
            top_values = logits.topk(min(max_k, self.vocab_size), dim=-1).values
            k = top_k.long().clamp(min=1)
            # Rows with top_k off compare against -inf, which keeps everything.
            kth_value = torch.where(top_k > 0, top_values.gather(1, k - 1), float("-inf"))
            # Compare by value, as transformers does: ties with the k-th logit all stay.
            logits.masked_fill_(logits < kth_value, float("-inf"))
        elif use_top_p:
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
            if use_top_k:
                # Rows with top_k off use k = vocab_size, whose cutoff is the smallest logit: keeps all.
                k = torch.where(top_k > 0, top_k, float(self.vocab_size)).long()
                kth_value = sorted_logits.gather(1, k - 1)
                # Compare by value, as transformers does: ties with the k-th logit all stay.
                sorted_logits.masked_fill_(sorted_logits < kth_value, float("-inf"))
            # float64 because CUDA's cumsum is not bitwise reproducible from call to call: in fp32
            # its wobble could move a token across the top_p line and break seeded reproducibility.
            sorted_probs = torch.softmax(sorted_logits, dim=-1).double()
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # A token stays while the mass of the more likely tokens is still short of top_p, which
            # keeps the smallest set reaching top_p and always the top token (mass before it is 0).
            # Rows with top_p == 1 get a bound of 2 so rounding in the cumsum cannot drop their tail.
            top_p = _to_device(
                [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)],
                torch.float64,
                device,
            )
            bound = torch.where(top_p < 1.0, top_p, 2.0).unsqueeze(1)
            sorted_logits.masked_fill_(mass_before >= bound, float("-inf"))
            logits.scatter_(1, sorted_idx, sorted_logits)

        probs = torch.softmax(logits, dim=-1)
        noise = self._exponential_noise(probs, rows, greedy)
        # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks i with probability p_i, and needs
        # no device->host sync or cumulative search (same result as the Gumbel-max trick).
        sampled = probs.div_(noise).argmax(dim=-1)
        if greedy_tokens is not None:
            sampled = torch.where(_to_device(greedy, torch.bool, device), greedy_tokens, sampled)
        return sampled

    def _exponential_noise(self, probs: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        seeded = [i for i, row in enumerate(rows) if not greedy[i] and row.seed is not None]
        num_unseeded = sum(not g for g in greedy) - len(seeded)
        tiny = torch.finfo(noise.dtype).tiny
        if num_unseeded > 0:
            # One call on the global generator for the whole batch; seeded rows are overwritten below.
            # -log(U) is Exp(1) too, and uniform draws cost a fifth of exponential_() on the CPU.
            noise.uniform_().clamp_(min=tiny).log_().neg_()
        else:
            noise.fill_(1.0)
        if seeded:
            generator = self._seeded_generator(probs.device)
            for i in seeded:
                # vocab_size exponentials from a generator seeded by (seed, position) alone: they depend
                # on nothing else in the batch, nor on how many times this position was sampled before.
                generator.manual_seed(_row_seed(rows[i].seed, len(rows[i].output_token_ids)))
                noise[i].exponential_(generator=generator)
        # An exact zero would turn 0/0 into NaN, which argmax would pick; the clamp changes nothing else.
        return noise.clamp_(min=tiny)

    def _seeded_generator(self, device: torch.device) -> torch.Generator:
        generator = self._seeded_generators.get(device)
        if generator is None:
            generator = self._seeded_generators[device] = torch.Generator(device=device)
        return generator


# ----- helpers ---------------------------------------------------------------------------------------------


def _uses_processors(rows: list[SamplingRow]) -> bool:
    """Whether any row's logits change before selection (bias, min_tokens, penalties, a grammar)."""
    for row in rows:
        p = row.params
        if row.grammar is not None or p.logit_bias or p.bad_words_token_ids or p.repetition_penalty != 1.0:
            return True
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            return True
        if len(row.output_token_ids) < p.min_tokens:
            return True
    return False


def _needs_filters(params: SamplingParams) -> bool:
    return not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)


def _row_seed(seed: int, position: int) -> int:
    """A 62-bit seed for one token of a seeded sequence (Philox in the kernel, the torch generator
    otherwise): a fixed mix of the two (LCG-style multipliers), the same in every process and
    whatever else is in the batch."""
    return (seed * 6364136223846793005 + (position + 1) * 1442695040888963407) % (1 << 62)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def _token_counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, vocab] float counts of each token id per row, built on the device with scatter_add."""
    num_rows = len(token_ids)
    lengths = [len(ids) for ids in token_ids]
    total = sum(lengths)
    counts = torch.zeros((num_rows, vocab + 1), dtype=torch.float32, device=device)
    if total == 0:
        return counts[:, :vocab]
    # The ids travel flat rather than padded: one long prompt would otherwise pad every row to its
    # length. numpy's fromiter converts Python ints several times faster than torch.tensor does.
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=total))
    flat = host_to_device(flat, device)
    row = torch.repeat_interleave(
        torch.arange(num_rows, device=device),
        _to_device(lengths, torch.int64, device),
        output_size=total,  # known on the host, so no device->host sync to size the result
    )
    # Ids the model cannot produce (>= vocab) land in a sink column that is dropped afterwards.
    index = row * (vocab + 1) + flat.clamp_(min=0, max=vocab)
    counts.view(-1).scatter_add_(0, index, torch.ones(total, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def _pack_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Chosen-token logprob and top-k alternatives as one [B, 2 + 2k] tensor, to move in one copy."""
    max_k = max(p.logprobs or 0 for p in params if p.logprobs is not None)
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1))
    parts = [token_ids.unsqueeze(1).double(), chosen.double()]
    if max_k > 0:
        top_values, top_ids = raw_logprobs.topk(max_k, dim=-1)
        # Token ids are exact in float64 (< 2**53), so everything can travel as one tensor.
        parts += [top_ids.double(), top_values.double()]
    return torch.cat(parts, dim=1)


def unpack_logprobs(packed_rows: list[list[float]], num_logprobs: list[int | None]) -> list[TokenLogprob | None]:
    """The host copy of `_pack_logprobs`' tensor as one TokenLogprob per row that asked for them."""
    max_k = (len(packed_rows[0]) - 2) // 2 if packed_rows else 0
    result: list[TokenLogprob | None] = []
    for k, values in zip(num_logprobs, packed_rows, strict=True):
        if k is None:
            result.append(None)
            continue
        alternatives = [(int(values[2 + j]), values[2 + max_k + j]) for j in range(k)]
        result.append(TokenLogprob(token_id=int(values[0]), logprob=values[1], top_logprobs=alternatives))
    return result
