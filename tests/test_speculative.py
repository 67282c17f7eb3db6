"""Speculative decoding never changes an answer (issue 14).

The oracle is the same engine with the same settings and speculation off (itself checked against
transformers' greedy `generate` in test_engine_parity.py, and once more here): greedy and seeded
requests must give exactly its tokens, text, finish and stop reasons and logprobs; unseeded ones
must draw each token from the target's distribution (a chi-square test against a direct
transformers forward). Every speculating engine carries a `SpeculationSpy`, which checks the
scheduler's bookkeeping after each step (1 + k tokens per row, rollback of rejected positions,
their blocks given back, no leaked or mis-cached block) and counts what speculation did, so that a
test cannot pass because speculation silently did nothing.

The target is a tiny random model over a 16-token vocabulary: its greedy and sampled outputs loop,
which gives the n-gram proposer real hits (on the full test vocabulary it accepts next to nothing).
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from shared_specs import SCHEMAS
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.scheduling.kv_cache import _ROOT_DIGEST, chain_digest
from engine.scheduling.request import Request, RequestStatus
from engine.speculation.config import SpeculativeConfig
from engine.speculation.ngram import propose_ngram
from engine.speculation.speculator import num_accepted
from tests.generate_oracle import greedy_generate

VOCAB = 16
TARGET = {"arch": "llama", "vocab_size": VOCAB}  # model_dir_factory kwargs
EOS = 2  # <|im_end|>; ids 0-2 are the special tokens, prompts use 3..15
FIRST_PLAIN_ID = 3

# One entry per proposer: the speculative_config without num_speculative_tokens. A "model" given
# as a dict is model_dir_factory kwargs laid over the engine's target (same tokenizer and vocabulary),
# built on first use.
# Speculation in every step, whatever the batch (the CPU's default stops above 8 sequences), so that
# large batches are covered too.
ALWAYS = {"disable_by_batch_size": 1 << 20}
PROPOSERS = [
    pytest.param({"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 4, **ALWAYS}, id="ngram"),
    # A smaller draft with the same tokenizer and other random weights.
    pytest.param({"method": "draft_model", "model": {"num_hidden_layers": 1, "seed": 1}, **ALWAYS}, id="draft_model"),
]
KS = [1, 3, 5]
ASYNC_MODES = [pytest.param(False, id="sync"), pytest.param(True, id="async")]

# Engine settings; "target" is the model (model_dir_factory kwargs). A pool of 24 blocks of 8 tokens
# and a budget of 24 tokens a step: long prompts are chunked, sequences are preempted and
# recomputed, and proposals are cut by the budget.
STRESS = {"target": TARGET, "block_size": 8, "num_kv_blocks": 24, "max_num_batched_tokens": 24, "max_model_len": 256}
# Room for everything: proposals depend on the sequence alone, so runs are comparable step by step.
# (An explicit pool: the default 1 GiB would be 131072 blocks, which the spy's checks walk.) The
# same weights, with two ordinary tokens as extra EOS ids: an n-gram proposal holds only tokens the
# sequence already has, so the special EOS (never in a prompt) is almost never proposed, and an
# EOS accepted mid-run needs EOS ids the prompts hold.
ROOMY = {
    "target": {**TARGET, "eos_token_id": [EOS, 4, 11]},
    "max_model_len": 256,
    "max_num_seqs": 512,
    "num_kv_blocks": 1024,
}

needs_xgrammar = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")


# ---- the spy ---------------------------------------------------------------------------------------


MAX_BUSY_STEPS = 2000  # steps in a row with requests unfinished; the longest workload here takes ~70


@dataclass
class Accept:
    request_id: str
    output_before: list[int]  # the sequence's output when the step was scheduled
    proposed: list[int]
    emitted: list[int]  # the accepted proposals and the target's token after them

    @property
    def num_output_before(self) -> int:
        return len(self.output_before)

    @property
    def num_accepted(self) -> int:
        return len(self.emitted) - 1

    def mid_run_positions(self) -> range:
        """Output positions of accepted proposals that have more tokens after them in this step:
        a stop there must discard the rest."""
        return range(self.num_output_before, self.num_output_before + self.num_accepted)


@dataclass
class _Row:
    request: Request
    start: int
    num_new: int
    kept: list[int]  # the proposals the step verifies (after the scheduler's cut)
    num_blocks_at_launch: int


@dataclass
class SpeculationSpy:
    """Records what one engine's speculation did and checks its bookkeeping after every step."""

    llm: LLM
    violations: list[str] = field(default_factory=list)
    accepts: list[Accept] = field(default_factory=list)
    num_speculative_rows: int = 0
    num_cut_rows: int = 0  # rows whose proposals the token budget shortened
    num_rejecting_rows: int = 0  # rows with at least one rejected proposal (rolled back)
    num_freed_blocks: int = 0  # blocks allocated for verified positions and given back after
    max_running_when_proposing: int = 0
    _proposed: dict[int, list[int]] = field(default_factory=dict)
    _rows: list[_Row] = field(default_factory=list)
    _num_busy_steps: int = 0

    def __post_init__(self) -> None:
        engine = self.llm.engine
        speculator, runner = engine.speculator, engine.runner
        propose, accept = speculator.propose, speculator.accept
        launch_forward, step = runner.launch_forward, engine.step

        def spy_propose(running):
            proposed = propose(running)
            self._proposed = {id(r): list(r.spec_token_ids) for r in proposed}
            if proposed:
                self.max_running_when_proposing = max(self.max_running_when_proposing, len(running))
            return proposed

        def spy_launch_forward(batch):
            self._check_launch(batch)
            return launch_forward(batch)

        def spy_accept(request, proposed, target):
            before = list(request.output_token_ids)
            emitted = accept(request, proposed, target)
            self.accepts.append(Accept(request.request_id, before, list(proposed), list(emitted)))
            return emitted

        def spy_step():
            self._proposed, self._rows = {}, []
            outputs = step()
            self._check_after_step()
            # A bookkeeping bug can leave a sequence that never finishes: fail rather than hang.
            self._num_busy_steps = self._num_busy_steps + 1 if engine.has_unfinished_requests() else 0
            if self._num_busy_steps > MAX_BUSY_STEPS:
                raise RuntimeError(f"the engine has not run out of work in {MAX_BUSY_STEPS} steps")
            return outputs

        speculator.propose, speculator.accept = spy_propose, spy_accept
        runner.launch_forward, engine.step = spy_launch_forward, spy_step

    def _fail(self, message: str) -> None:
        if len(self.violations) < 20:
            self.violations.append(message)

    def _check_launch(self, batch) -> None:
        engine = self.llm.engine
        block_size = engine.kv_cache.block_size
        if batch.total_tokens > engine.scheduler.max_num_batched_tokens:
            self._fail(f"step of {batch.total_tokens} tokens over the budget")
        scheduled = set()
        for request, start, num_new in zip(batch.requests, batch.starts, batch.num_new_tokens):
            scheduled.add(id(request))
            kept = list(request.spec_token_ids)
            if not kept:
                continue
            self.num_speculative_rows += 1
            proposed = self._proposed.get(id(request), [])
            name = request.request_id
            if kept != proposed[: len(kept)]:
                self._fail(f"{name}: verifies {kept}, not a prefix of the proposals {proposed}")
            if len(kept) < len(proposed):
                self.num_cut_rows += 1
                # Proposals are cut only when the budget runs out, and then it is spent in full.
                if batch.total_tokens != engine.scheduler.max_num_batched_tokens:
                    self._fail(f"{name}: proposals cut with budget left ({batch.total_tokens} tokens)")
            if start != request.num_tokens - 1 or num_new != 1 + len(kept):
                self._fail(f"{name}: start {start}, {num_new} tokens for {request.num_tokens} tokens + {kept}")
            if len(request.block_ids) < -(-(start + num_new) // block_size):
                self._fail(f"{name}: {len(request.block_ids)} blocks for {start + num_new} positions")
            self._rows.append(_Row(request, start, num_new, kept, len(request.block_ids)))
        for request in engine.scheduler.running:
            if id(request) not in scheduled and request.spec_token_ids:
                self._fail(f"{request.request_id}: unscheduled but keeps proposals {request.spec_token_ids}")

    def _check_after_step(self) -> None:
        engine = self.llm.engine
        block_size = engine.kv_cache.block_size
        if self._rows and engine._in_flight is not None:
            self._fail("a speculating step left a step in flight")
        accepts = {a.request_id: a for a in self.accepts[-len(self._rows) :]} if self._rows else {}
        for row in self._rows:
            request, name = row.request, row.request.request_id
            accept = accepts.get(name)
            if accept is not None and accept.num_accepted < len(row.kept):
                self.num_rejecting_rows += 1
            if request.is_finished:
                if request.block_ids:
                    self._fail(f"{name}: finished holding blocks {request.block_ids}")
                continue
            if request.spec_token_ids:
                self._fail(f"{name}: proposals {request.spec_token_ids} outlive their step")
            if request.num_computed_tokens != request.num_tokens - 1:
                self._fail(f"{name}: {request.num_computed_tokens} computed of {request.num_tokens} after verification")
            # Blocks for the known tokens (the last one's K/V comes next step), none for rejected positions.
            expected_blocks = -(-min(request.num_tokens, row.start + row.num_new) // block_size)
            if len(request.block_ids) != expected_blocks:
                self._fail(f"{name}: {len(request.block_ids)} blocks, expected {expected_blocks}")
            self.num_freed_blocks += max(0, row.num_blocks_at_launch - len(request.block_ids))
        self._check_pool()

    def _check_pool(self) -> None:
        """Every block reference belongs to a live sequence, and every cached block hash covers
        verified tokens only (an unverified token in the prefix cache would serve wrong K/V)."""
        engine = self.llm.engine
        pool, block_size = engine.kv_cache.pool, engine.kv_cache.block_size
        sequences = [*engine.scheduler.running, *engine.scheduler.waiting]
        holders = Counter(b for s in sequences for b in s.block_ids)
        leaked = [b for b in range(pool.num_blocks) if pool.ref_counts[b] != holders[b]]
        if leaked:
            self._fail(f"blocks {leaked[:8]} have ref counts {[pool.ref_counts[b] for b in leaked[:8]]}")
        for sequence in sequences:
            verified = min(sequence.num_computed_tokens, sequence.num_tokens)
            if len(sequence.block_hashes) * block_size > verified:
                self._fail(f"{sequence.request_id}: {len(sequence.block_hashes)} blocks hashed, {verified} verified")
                continue
            parent = _ROOT_DIGEST
            for index, digest in enumerate(sequence.block_hashes):
                parent = chain_digest(parent, sequence.token_ids_in(index * block_size, (index + 1) * block_size))
                if digest != parent:
                    self._fail(f"{sequence.request_id}: block {index} hashed over other tokens")
                    break

    def mid_run_positions(self, request_id: str) -> set[int]:
        return {p for a in self.accepts if a.request_id == request_id for p in a.mid_run_positions()}

    def last_accept(self, request_id: str) -> Accept | None:
        return next((a for a in reversed(self.accepts) if a.request_id == request_id), None)


# ---- engines -----------------------------------------------------------------------------------------


@dataclass
class Engine:
    llm: LLM
    spy: SpeculationSpy | None

    def spec_stats(self) -> dict[str, int]:
        stats = self.llm.stats()
        return {key: stats[key] for key in ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")}


def _speculative_config(proposer: dict[str, Any], k: int, model_dir_factory, target: dict[str, Any]) -> dict[str, Any]:
    config = {**proposer, "num_speculative_tokens": k}
    if isinstance(config.get("model"), dict):
        config["model"] = str(model_dir_factory(**{**target, **config["model"]}))
    return config


@pytest.fixture(scope="module")
def target_dir(model_dir_factory):
    return model_dir_factory(**TARGET)


@pytest.fixture(scope="module")
def make_engine(model_dir_factory):
    """`make_engine(settings, proposer=None, k=0, async_scheduling=False) -> Engine`, built once
    per module for each distinct argument set (LLMs are the expensive part here)."""
    built: dict[str, Engine] = {}

    def make(
        settings: dict[str, Any], proposer: dict[str, Any] | None = None, k: int = 0, async_scheduling: bool = False
    ) -> Engine:
        key = json.dumps([settings, proposer, k, async_scheduling], sort_keys=True, default=str)
        if key not in built:
            target = settings["target"]
            speculative = None if proposer is None else _speculative_config(proposer, k, model_dir_factory, target)
            engine_settings = {key: value for key, value in settings.items() if key != "target"}
            llm = LLM(
                model=str(model_dir_factory(**target) if isinstance(target, dict) else target),
                device="cpu",
                dtype="float32",
                async_scheduling=async_scheduling,
                speculative_config=speculative,
                **engine_settings,
            )
            if speculative is not None:
                # Every sequence keeps getting proposals, however poor its acceptance: the bookkeeping
                # under test must see them all (the acceptance gate has its own test).
                llm.engine.speculator.min_acceptance = 0.0
            built[key] = Engine(llm, None if speculative is None else SpeculationSpy(llm))
        return built[key]

    yield make
    for engine in built.values():
        engine.llm.shutdown()


@pytest.fixture(scope="module")
def plain_outputs(make_engine):
    """`plain_outputs(settings, name, prompts, params)`: the speculation-free engine's outputs,
    computed once per (settings, name) and shared by every proposer and k."""
    cache: dict[str, list] = {}

    def get(settings: dict[str, Any], name: str, prompts: list, params: list[SamplingParams]) -> list:
        key = json.dumps(settings, sort_keys=True) + name
        if key not in cache:
            cache[key] = make_engine(settings).llm.generate(prompts, params)
        return cache[key]

    return get


def _random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_PLAIN_ID, VOCAB) for _ in range(n)] for n in lengths]


def _summary(outputs) -> tuple[list, list[float]]:
    """What must match exactly (ids, text, reasons, top-logprob ids), and the logprob values."""
    exact, values = [], []
    for out in outputs:
        for c in out.outputs:
            logprobs = c.logprobs or []
            top_ids = [[t for t, _ in e.top_logprobs] for e in logprobs]
            exact.append((c.token_ids, c.text, c.finish_reason, c.stop_reason, top_ids))
            values += [v for e in logprobs for v in (e.logprob, *(v for _, v in e.top_logprobs))]
            if c.cumulative_logprob is not None:
                values.append(c.cumulative_logprob)
    return exact, values


def _assert_same(got_outputs, expected_outputs) -> None:
    got, got_values = _summary(got_outputs)
    expected, expected_values = _summary(expected_outputs)
    assert got == expected
    # A row verified among 1 + k query tokens sums its float32 logits in another order than a lone
    # decode row: values agree to about 1e-5 relative (cumulative logprobs sum 30-odd of them).
    np.testing.assert_allclose(got_values, expected_values, rtol=1e-5, atol=1e-5)


def _all_blocks_free(llm: LLM) -> bool:
    stats = llm.stats()  # with prefix caching, cached blocks nobody holds count as free
    return stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after if isinstance(after[key], int)}


# ---- unit tests ----------------------------------------------------------------------------------------


def _ngram_oracle(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Brute force: for n from max_n down, the latest earlier occurrence of the last n tokens."""
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        suffix = tokens[length - n :] if 0 < n < length else None
        if suffix is None:
            continue
        for end in range(length - 2, n - 2, -1):  # an occurrence ending before the last token
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + k]
    return []


def test_propose_ngram_matches_brute_force():
    rng = random.Random(0)
    num_hits = 0
    for _ in range(3000):
        tokens = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(0, 24))]
        k, min_n = rng.randrange(0, 6), rng.randrange(1, 4)
        max_n = min_n + rng.randrange(0, 4)
        expected = _ngram_oracle(tokens, k, min_n, max_n)
        got = propose_ngram(np.array(tokens, dtype=np.int64), k, min_n, max_n)
        assert got == expected, (tokens, k, min_n, max_n)
        assert len(got) <= k
        num_hits += bool(got)
    assert 500 < num_hits < 2900  # both outcomes well covered


def test_propose_ngram_examples():
    def propose(tokens, k=3, min_n=1, max_n=4):
        return propose_ngram(np.array(tokens, dtype=np.int64), k, min_n, max_n)

    assert propose([1, 2, 3, 4, 1, 2]) == [3, 4, 1]  # the 2-gram (1, 2) is found
    assert propose([1, 2, 3, 4, 1, 2], k=1) == [3]  # at most k
    assert propose([5, 9, 7, 9, 8, 9]) == [8, 9]  # the most recent occurrence, cut at the end
    assert propose([1, 2, 7, 3, 2, 8, 1, 2]) == [7, 3, 2]  # (1, 2) beats the later 1-gram (2)
    assert propose([1, 2, 7, 3, 2, 8, 1, 2], min_n=3) == []  # no 3-gram repeats
    assert propose([1, 2, 3]) == [] and propose([4]) == [] and propose([]) == []
    assert propose([6, 6]) == [6]  # an occurrence may overlap the suffix
    assert propose([1, 2, 1, 2], k=0) == []


@pytest.mark.parametrize(
    "value, key, why",
    [
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens", r"\[1, 16\], got 0"),
        ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens", "got 17"),
        ({"method": "ngram"}, "num_speculative_tokens", "is required"),
        ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens", "must be an integer"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens", "must be an integer"),
        ({"method": "medusa", "num_speculative_tokens": 3}, "method", "must be one of"),
        ({"num_speculative_tokens": 3, "prompt_lookup_min": 0}, "prompt_lookup_min", ">= 1"),
        ({"num_speculative_tokens": 3, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max", ">="),
        ({"num_speculative_tokens": 3, "prompt_lookup_max": 2.5}, "prompt_lookup_max", "must be an integer"),
        ({"num_speculative_tokens": 3, "disable_by_batch_size": 0}, "disable_by_batch_size", ">= 1"),
        ({"method": "draft_model", "num_speculative_tokens": 3}, "model", "is required"),
        ({"method": "ngram", "num_speculative_tokens": 3, "model": "m"}, "model", "draft_model"),
    ],
)
def test_speculative_config_errors_name_the_key(value, key, why):
    with pytest.raises(ValueError, match=rf"Invalid value for 'speculative_config\.{key}':.*{why}"):
        SpeculativeConfig.parse(value)
    with pytest.raises(ValueError, match=rf"'speculative_config\.{key}'"):  # the same check in EngineConfig
        EngineConfig(speculative_config=value)


@pytest.mark.parametrize(
    "value, why",
    [
        ('{"method": "ngram",', "not valid JSON"),
        ([1, 2], "expected an object"),
        ({"num_speculative_tokens": 3, "lookahead": 2}, r"unknown key\(s\) \['lookahead'\]"),
    ],
)
def test_speculative_config_shape_errors(value, why):
    with pytest.raises(ValueError, match=rf"Invalid value for 'speculative_config': .*{why}"):
        SpeculativeConfig.parse(value)


def test_speculative_config_parses_json_and_infers_the_method():
    assert SpeculativeConfig.parse(None) is None
    from_json = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}')
    assert from_json == SpeculativeConfig("ngram", 2, prompt_lookup_max=3)
    assert SpeculativeConfig.parse({"num_speculative_tokens": 4}).method == "ngram"
    assert SpeculativeConfig.parse({"num_speculative_tokens": 4, "model": "m"}).method == "draft_model"
    with pytest.raises(ValueError, match="'speculative_config'.*tensor_parallel_size"):
        EngineConfig(speculative_config={"model": "m", "num_speculative_tokens": 2}, tensor_parallel_size=2)


def test_num_accepted_counts_the_matching_prefix():
    assert num_accepted([4, 5, 6], [4, 5, 7, 8]) == 2
    assert num_accepted([4, 5, 6], [4, 5, 6, 9]) == 3
    assert num_accepted([4, 5, 6], [1, 5, 6, 9]) == 0  # a later match does not count
    assert num_accepted([], [3]) == 0


# ---- token-for-token equality with plain decoding ---------------------------------------------------------


def _mixed_workload() -> tuple[list[list[int]], list[SamplingParams]]:
    """Every kind of request at once: greedy and seeded, n > 1, penalties, bias, min_tokens,
    logprobs, stops; a 70-token prompt (chunked) and two prompts sharing a 3-block prefix."""
    prompts = _random_prompts([5, 9, 14, 3, 20, 70, 11, 7, 6, 12], seed=1)
    shared = _random_prompts([24], seed=2)[0]
    prompts += [shared + suffix for suffix in _random_prompts([2, 5], seed=3)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=1, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, max_tokens=30, n=3),
        SamplingParams(temperature=0.0, max_tokens=32, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=0.0, max_tokens=28, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=32, logit_bias={5: 2.0, 7: -3.0, EOS: -100.0}),
        SamplingParams(temperature=0.0, max_tokens=32, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=4, max_tokens=32, logprobs=2, min_tokens=10, stop_token_ids=[13]),
        SamplingParams(temperature=0.0, max_tokens=32, stop=["+-", "$$"], ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.9, seed=5, max_tokens=32, presence_penalty=0.4),
        SamplingParams(temperature=0.0, max_tokens=32, min_tokens=12, logit_bias={EOS: 3.0}),
        SamplingParams(temperature=1.0, seed=6, max_tokens=32, repetition_penalty=1.2, logprobs=1),
    ]
    return prompts, params


def _cache_workloads(outputs=None) -> tuple[list[list[int]], list[SamplingParams]]:
    """Two small batches for prefix-cache hits: the first computes a shared prefix and two outputs
    (with speculation), the second, once it finished, reuses the prefix and extends the prompts
    with their outputs, so that it hits blocks whose K/V speculation computed. Small enough that
    the first batch's blocks all stay cached until the second is admitted."""
    shared = _random_prompts([24], seed=2)[0]
    first_prompts = [shared + _random_prompts([2], seed=3)[0], _random_prompts([7], seed=4)[0]]
    if outputs is None:
        return first_prompts, [
            SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=8, max_tokens=30, ignore_eos=True),
        ]
    prompts = [shared + _random_prompts([3], seed=5)[0]]  # first: admitted before the others allocate
    prompts += [prompt + out.outputs[0].token_ids[:21] for prompt, out in zip(first_prompts, outputs)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=9, max_tokens=20, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    ]
    return prompts, params


@pytest.mark.parametrize("async_scheduling", ASYNC_MODES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_mixed_batch_matches_plain_decoding(make_engine, plain_outputs, proposer, k, async_scheduling):
    """Under preemption, chunked prefill, budget cuts and prefix-cache hits (also on blocks that
    speculation computed), every greedy and seeded sample equals plain decoding's."""
    spec = make_engine(STRESS, proposer, k, async_scheduling)
    prompts, params = _mixed_workload()
    before = spec.llm.stats()
    outputs = spec.llm.generate(prompts, params)
    _assert_same(outputs, plain_outputs(STRESS, "mixed", prompts, params))
    first = _delta(spec.llm.stats(), before)
    assert spec.spy.violations == []
    assert first["spec_num_draft_tokens"] > 0 and first["spec_num_accepted_tokens"] > 0, first
    assert first["num_preemptions"] > 0, "the workload no longer forces preemption"
    assert _all_blocks_free(spec.llm)

    prompts, params = _cache_workloads()
    outputs = spec.llm.generate(prompts, params)
    _assert_same(outputs, plain_outputs(STRESS, "cache", prompts, params))
    prompts2, params2 = _cache_workloads(outputs)
    before = spec.llm.stats()
    outputs2 = spec.llm.generate(prompts2, params2)
    _assert_same(outputs2, plain_outputs(STRESS, "reuse", prompts2, params2))
    assert _delta(spec.llm.stats(), before)["spec_num_accepted_tokens"] > 0
    # Whole blocks, short of the last token: the shared 24-token prefix, then 40 of 26 + 21 and 24
    # of 7 + 21 tokens of prompt + output, i.e. blocks that hold output tokens verified by speculation.
    assert [o.num_cached_tokens for o in outputs2] == [24, 40, 24]
    assert spec.spy.violations == []
    assert _all_blocks_free(spec.llm)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_scheduler_schedules_one_plus_k_and_rolls_back(make_engine, plain_outputs, proposer):
    """The spy's per-step checks (1 + k tokens a row, proposals cut only by an exhausted budget,
    num_computed_tokens == num_tokens - 1 and exactly ceil(min(num_tokens, verified positions) /
    block_size) blocks after verification) must each have been exercised, not merely held."""
    spec = make_engine(STRESS, proposer, 5)
    prompts = _random_prompts([4, 6, 9, 5, 7, 3], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    spy = spec.spy
    counts = (spy.num_speculative_rows, spy.num_cut_rows, spy.num_rejecting_rows, spy.num_freed_blocks)
    _assert_same(spec.llm.generate(prompts, params), plain_outputs(STRESS, "scheduler", prompts, [params] * 6))
    rows, cut, rejecting, freed = (
        after - before
        for after, before in zip(
            (spy.num_speculative_rows, spy.num_cut_rows, spy.num_rejecting_rows, spy.num_freed_blocks), counts
        )
    )
    assert spy.violations == []
    assert rows > 20 and rejecting > 0 and freed > 0, (rows, cut, rejecting, freed)
    # The budget cut is the scheduler's, whatever proposes; with the draft model, whose proposals
    # take their blocks before scheduling, this tight pool leaves fewer rows to cut.
    assert cut > 0 or proposer["method"] == "draft_model", (rows, cut, rejecting, freed)


def test_disable_by_batch_size_speculates_only_small_batches(make_engine, plain_outputs):
    ngram = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    spec = make_engine(ROOMY, {**ngram, "disable_by_batch_size": 2}, 3)
    prompts = _random_prompts([5, 8, 6, 9], seed=12)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (6, 10, 40, 40)]
    _assert_same(spec.llm.generate(prompts, params), plain_outputs(ROOMY, "disable", prompts, params))
    assert spec.spec_stats()["spec_num_draft_tokens"] > 0  # once two sequences are left
    assert spec.spy.max_running_when_proposing == 2


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_greedy_matches_transformers_generate(make_engine, target_dir, proposer):
    """Once against the independent oracle: the most aggressive setting (k=5, async, preemption,
    chunked prefill) gives transformers' greedy tokens (EOS allowed, included as generate does)."""
    spec = make_engine(STRESS, proposer, 5, True)
    prompts = _random_prompts([6, 40, 11, 3, 17], seed=13)
    before = spec.spec_stats()
    outputs = spec.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32))
    assert [o.outputs[0].token_ids for o in outputs] == greedy_generate(target_dir, prompts, 32)
    assert _delta(spec.spec_stats(), before)["spec_num_accepted_tokens"] > 0


# ---- stops inside an accepted run --------------------------------------------------------------------------


@dataclass
class _StopCase:
    kind: str
    prompt: list[int]
    params: SamplingParams
    position: int  # the output position the stop (or the last token) falls on


def _stop_cases(spec: Engine, tokenizer) -> list[_StopCase]:
    """Probes the speculating engine, then builds requests whose EOS, stop token, stop string or
    max_tokens falls on an accepted proposal with more tokens after it in its step (and one whose
    min_tokens carries a stop token past such a position)."""
    prompts = [_random_prompts([4 + i % 12], seed=100 + i)[0] for i in range(96)]
    probes = [
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(temperature=1.0, seed=i, max_tokens=32, ignore_eos=True)
        for i in range(len(prompts))
    ]
    chars = [tokenizer.decode([t]) if t >= FIRST_PLAIN_ID else "" for t in range(VOCAB)]  # specials are skipped
    eos_ids = spec.llm.engine.eos_token_ids
    cases: dict[str, list[_StopCase]] = defaultdict(list)
    for prompt, probe, out in zip(prompts, probes, spec.llm.generate(prompts, probes)):
        tokens = out.outputs[0].token_ids
        same = {"temperature": probe.temperature, "seed": probe.seed, "max_tokens": 32}
        ends = np.cumsum([len(chars[t]) for t in tokens])  # where each token's text ends
        text = "".join(chars[t] for t in tokens)
        first_eos = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        for p in sorted(spec.spy.mid_run_positions(out.request_id)):
            t = tokens[p]
            if p == first_eos:
                cases["eos"].append(_StopCase("eos", prompt, SamplingParams(**same), p))
            if tokens.index(t) == p:  # its first occurrence: the stop lands here
                stop_at = SamplingParams(**same, stop_token_ids=[t], ignore_eos=True)
                cases["stop_token"].append(_StopCase("stop_token", prompt, stop_at, p))
                # Masked below min_tokens, the stop token cannot be accepted at p, but can right after.
                past = SamplingParams(**same, stop_token_ids=[t], ignore_eos=True, min_tokens=p + 1)
                cases["min_tokens"].append(_StopCase("min_tokens", prompt, past, p))
            for width in (1, 2, 3):  # the shortest text ending here that occurs nowhere earlier
                stop = text[max(0, ends[p] - width) : ends[p]]
                if chars[t] and len(stop) == width and text.find(stop) + width == ends[p]:
                    params = SamplingParams(**same, stop=[stop], ignore_eos=True)
                    cases["stop_string"].append(_StopCase("stop_string", prompt, params, p))
                    break
        # max_tokens ending on a proposal accepted at least one position into its step.
        for accept in spec.spy.accepts:
            if accept.request_id == out.request_id and accept.num_accepted >= min(2, spec_k(spec)):
                p = accept.num_output_before + max(1, accept.num_accepted - 1)
                params = SamplingParams(**{**same, "max_tokens": p + 1}, ignore_eos=True)
                cases["max_tokens"].append(_StopCase("max_tokens", prompt, params, p))
                break
    kinds = ["eos", "stop_token", "min_tokens", "stop_string", "max_tokens"]
    missing = [kind for kind in kinds if not cases[kind]]
    assert not missing, f"the probe found no request whose {missing} falls inside an accepted run"
    chosen = []
    for kind in kinds:  # two greedy and two seeded of each kind where there are
        greedy = [c for c in cases[kind] if c.params.seed is None]
        seeded = [c for c in cases[kind] if c.params.seed is not None]
        chosen += (greedy[:2] + seeded[:2] + greedy[2:] + seeded[2:])[:4]
    return chosen


def spec_k(spec: Engine) -> int:
    return spec.llm.engine.speculator.config.num_speculative_tokens


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_stops_inside_accepted_runs_match_plain_decoding(make_engine, proposer, k):
    """EOS, stop tokens, stop strings, min_tokens and max_tokens apply to the accepted tokens in
    order: the tokens after a stop in the same step are dropped, as plain decoding never made them."""
    spec = make_engine(ROOMY, proposer, k)
    cases = _stop_cases(spec, spec.llm.get_tokenizer())
    prompts, params = [c.prompt for c in cases], [c.params for c in cases]
    outputs = spec.llm.generate(prompts, params)
    _assert_same(outputs, make_engine(ROOMY).llm.generate(prompts, params))
    assert spec.spy.violations == []
    for case, out in zip(cases, outputs):
        completion, last = out.outputs[0], spec.spy.last_accept(out.request_id)
        tokens, where = completion.token_ids, (case.kind, case.position, completion, last)
        if case.kind == "min_tokens":
            assert len(tokens) > case.position + 1 or completion.finish_reason == "length", where
        elif case.kind == "max_tokens":
            # Proposals never run past max_tokens: the last step's accepted run ends exactly there.
            assert completion.finish_reason == "length" and len(tokens) == case.position + 1, where
            assert last.num_accepted >= 1 and last.num_output_before + len(last.emitted) == len(tokens), where
        else:
            assert completion.finish_reason == "stop" and len(tokens) == case.position + 1, where
            # The stop fell on an accepted proposal with more tokens after it, which were dropped.
            assert last.num_output_before <= case.position < last.num_output_before + last.num_accepted, where
    assert _all_blocks_free(spec.llm)


# ---- grammars, unseeded sampling, leaks, the draft model ----------------------------------------------------


@needs_xgrammar
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_grammar_constrained_requests_are_not_speculated(make_engine, model_dir_factory, proposer):
    from engine.sampling.structured_outputs import StructuredOutputsParams

    settings = {**ROOMY, "target": {"arch": "qwen3"}}  # a grammar needs the tokenizer's full vocabulary
    spec, plain = make_engine(settings, proposer, 3), make_engine(settings)
    constraint = StructuredOutputsParams(json=SCHEMAS["nested"])
    prompts = ["Give me JSON", "the cat the cat the cat the cat", "{", "1 2 3 1 2 3 1 2 3"]
    constrained = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=constraint)] * 2 + [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=40, structured_outputs=constraint) for seed in (1, 2)
    ]
    before = spec.spec_stats()
    _assert_same(spec.llm.generate(prompts, constrained), plain.llm.generate(prompts, constrained))
    assert _delta(spec.spec_stats(), before) == {key: 0 for key in before}
    # Beside unconstrained requests, which are speculated, they still decode as plain decoding does.
    prompts, params = prompts * 2, constrained + [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)] * 4
    before = spec.spec_stats()
    _assert_same(spec.llm.generate(prompts, params), plain.llm.generate(prompts, params))
    assert _delta(spec.spec_stats(), before)["spec_num_draft_tokens"] > 0
    assert spec.spy.violations == [] and _all_blocks_free(spec.llm)


def _pearson(observed: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, tokens expected fewer than 5 times pooled."""
    expected = observed.sum() * probs
    order = np.argsort(-expected)
    kept = [i for i in order if expected[i] >= 5]
    rest = [i for i in order if expected[i] < 5]
    bins_observed, bins_expected = [observed[i] for i in kept], [expected[i] for i in kept]
    if rest:
        if expected[rest].sum() >= 5 or not kept:
            bins_observed.append(observed[rest].sum())
            bins_expected.append(expected[rest].sum())
        else:
            bins_observed[-1] += observed[rest].sum()
            bins_expected[-1] += expected[rest].sum()
    bins_observed, bins_expected = np.array(bins_observed, dtype=float), np.array(bins_expected)
    return float(((bins_observed - bins_expected) ** 2 / bins_expected).sum()), len(bins_expected) - 1


def _next_token_probs(model, sequences: list[list[int]], temperature: float) -> np.ndarray:
    """The target's distribution of the token after each sequence (all of one length), float64."""
    with torch.no_grad():
        logits = model(torch.tensor(sequences)).logits[:, -1].double() / temperature
    return torch.softmax(logits, dim=-1).numpy()


def _prompt_for_the_chi_square(model, temperature: float) -> list[int]:
    """Of some random prompts, the one whose third output token is most often sampled at a verified
    position after an accepted n-gram proposal, from a spread-out distribution: weight of (first
    token t, proposal d) = P(t) * P(second token = d) * (1 - the largest P(third token))."""
    candidates = _random_prompts([12] * 40, seed=51)
    first = _next_token_probs(model, candidates, temperature)
    second = _next_token_probs(model, [c + [t] for c in candidates for t in range(VOCAB)], temperature)
    proposals = [[propose_ngram(np.array(c + [t]), 1, 1, 4) or [0] for t in range(VOCAB)] for c in candidates]
    third = _next_token_probs(
        model, [c + [t, proposals[i][t][0]] for i, c in enumerate(candidates) for t in range(VOCAB)], temperature
    )
    second = second.reshape(len(candidates), VOCAB, VOCAB)
    spread = 1 - third.max(axis=-1).reshape(len(candidates), VOCAB)
    scores = [
        sum(first[i, t] * second[i, t, proposals[i][t][0]] * spread[i, t] for t in range(VOCAB))
        for i in range(len(candidates))
    ]
    return candidates[int(np.argmax(scores))]


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_unseeded_tokens_after_accepted_proposals_follow_the_target(make_engine, model_dir_factory, proposer):
    """An unseeded token sampled at a verified position after accepted proposals is an exact sample
    of the target given the tokens before it: a chi-square test against transformers, per prefix.
    (Tried against two planted bugs: verified rows that ignore the temperature, and verified rows
    that read the previous position's logits; both give p < 1e-40.)"""
    stats = pytest.importorskip("scipy.stats")
    temperature = 1.5  # spreads the tiny model's peaked distributions; not 1, so a lost temperature shows
    model = AutoModelForCausalLM.from_pretrained(model_dir_factory(**ROOMY["target"]), dtype=torch.float32).eval()
    prompt = _prompt_for_the_chi_square(model, temperature)
    if proposer["method"] == "draft_model":
        # The target as its own (greedy) draft: its proposals are accepted often enough to test.
        proposer = {**proposer, "model": {}}
    spec = make_engine(ROOMY, proposer, 3)
    first = len(spec.spy.accepts)
    torch.manual_seed(0)  # unseeded rows draw from torch's global generator: a reproducible test
    params = SamplingParams(temperature=temperature, max_tokens=4, n=50, ignore_eos=True)
    spec.llm.generate([prompt] * 30, params)
    groups: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    for accept in spec.spy.accepts[first:]:
        for j in range(1, len(accept.emitted)):  # emitted[j] was sampled after j accepted proposals
            groups[tuple(accept.output_before + accept.emitted[:j])][accept.emitted[j]] += 1
    tested = {prefix: counts for prefix, counts in groups.items() if sum(counts.values()) >= 40}
    total_stat, total_dof, num_samples = 0.0, 0, 0
    for prefix, counts in tested.items():
        probs = _next_token_probs(model, [prompt + list(prefix)], temperature)[0]
        observed = np.bincount(list(counts.elements()), minlength=VOCAB)
        stat, dof = _pearson(observed, probs)
        total_stat, total_dof, num_samples = total_stat + stat, total_dof + dof, num_samples + observed.sum()
    # Enough samples over enough bins for the test to have power (about 1000 over 17 bins today).
    assert num_samples >= 500 and total_dof >= 8, (num_samples, total_dof)
    p_value = stats.chi2.sf(total_stat, total_dof)
    assert p_value > 1e-3, (total_stat, total_dof, {prefix: dict(counts) for prefix, counts in tested.items()})


@pytest.mark.parametrize("async_scheduling", ASYNC_MODES)
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_no_block_leaks_after_finish_abort_and_preemption(make_engine, proposer, async_scheduling):
    spec = make_engine(STRESS, proposer, 3, async_scheduling)
    engine = spec.llm.engine
    prompts = _random_prompts([6, 30, 9, 14, 5, 40, 8, 12], seed=61)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            temperature=1.0 if i % 2 else 0.0, seed=i, max_tokens=36 + 3 * i, ignore_eos=True, n=2 if i == 3 else 1
        )
        engine.add_request(f"leak-{i}", prompt, params)
    before = spec.llm.stats()
    aborted: dict[str, str] = {}  # request id -> its state when aborted

    def abort(request_id: str, state: str) -> None:
        assert engine.abort_request(request_id) is not None, request_id
        aborted[request_id] = state

    for step in range(3000):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        if step == 6:
            abort("leak-1", "running")
            abort("leak-3", "running, n=2")
        if step == 8:
            engine.add_request("leak-late", _random_prompts([20], seed=62)[0], SamplingParams(max_tokens=30))
        if step == 9:
            abort("leak-late", "just added")
        preempted = [r for r in engine.scheduler.waiting if r.num_preemptions and r.user_request_id not in aborted]
        if preempted and "preempted" not in aborted.values():
            abort(preempted[0].user_request_id, "preempted")
    else:
        pytest.fail("the requests did not finish in 3000 steps")
    delta = _delta(spec.llm.stats(), before)
    assert "preempted" in aborted.values(), "no request was preempted while it ran"
    assert delta["spec_num_accepted_tokens"] > 0 and delta["num_preemptions"] > 0, delta
    assert spec.spy.violations == []
    assert _all_blocks_free(spec.llm)


def test_draft_model_equal_to_target_accepts_every_proposal(make_engine, plain_outputs):
    """A check of the bookkeeping: a draft that is the target proposes exactly its greedy tokens."""
    spec = make_engine(ROOMY, {"method": "draft_model", "model": {}, **ALWAYS}, 3)
    prompts = _random_prompts([5, 9, 14, 30], seed=71)
    params = [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)] * len(prompts)
    before = spec.spec_stats()  # the engine is shared with the unseeded test
    _assert_same(spec.llm.generate(prompts, params), plain_outputs(ROOMY, "draft", prompts, params))
    stats = _delta(spec.spec_stats(), before)
    assert stats["spec_num_draft_tokens"] > 0
    assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"], stats
    assert spec.spy.violations == [] and _all_blocks_free(spec.llm)


def test_a_draft_whose_vocabulary_does_not_cover_the_targets_is_refused(model_dir_factory):
    target = model_dir_factory("qwen3")  # the test tokenizer's full vocabulary
    draft = model_dir_factory(**TARGET)  # 16 tokens
    with pytest.raises(ValueError, match=r"speculative_config\.model.*vocabulary \(16 tokens\)"):
        LLM(
            model=str(target),
            device="cpu",
            num_kv_blocks=16,
            speculative_config={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2},
        )


def test_the_batch_size_limit_defaults_per_device_and_an_explicit_one_wins():
    config = SpeculativeConfig.parse({"num_speculative_tokens": 2})
    assert config.batch_size_limit("cpu") == 8 and config.batch_size_limit("cuda") == 32
    explicit = SpeculativeConfig.parse({"num_speculative_tokens": 2, "disable_by_batch_size": 3})
    assert explicit.batch_size_limit("cuda") == 3


def test_under_async_scheduling_the_speculator_backs_off_after_steps_with_nothing_to_propose():
    """Proposing reads the step in flight first (no overlap for that step): after a step that found
    nothing, 1, 2, 4, ... 16 steps pass without trying; a step that finds something resets it."""
    from engine.scheduling.kv_cache import KVCacheManager
    from engine.speculation.speculator import MAX_BACKOFF_STEPS, Speculator

    class Fixed:
        tokens: list[int] = []

        def propose(self, requests, num_tokens):
            return [list(self.tokens) for _ in requests]

    proposer = Fixed()
    config = SpeculativeConfig.parse({"num_speculative_tokens": 2})
    speculator = Speculator(config, KVCacheManager(8, 4), proposer)
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=100))
    request.status, request.num_computed_tokens = RequestStatus.RUNNING, 2

    def tries(steps: int, draining: bool) -> list[bool]:
        made = []
        for _ in range(steps):
            active = speculator.active(1, draining)
            if active:
                speculator.propose([request])
            made.append(active)
        return made

    # Found nothing: sits out 1, then 2, then 4 steps ... capped at MAX_BACKOFF_STEPS.
    pattern = tries(1 + 1 + 1 + 2 + 1 + 4 + 1, draining=True)
    assert pattern == [True, False, True, False, False, True, False, False, False, False, True]
    assert tries(8 + 1, draining=True) == [False] * 8 + [True]
    assert MAX_BACKOFF_STEPS == 16  # so the sit-out doubled to 16 there, and stays at 16:
    assert tries(2 * (MAX_BACKOFF_STEPS + 1), draining=True) == ([False] * MAX_BACKOFF_STEPS + [True]) * 2
    # Synchronous steps lose nothing by proposing: they try every time.
    assert tries(3, draining=False) == [True] * 3
    # A step that finds a proposal ends the back-off.
    proposer.tokens = [7]
    assert tries(1, draining=False) == [True]
    assert tries(3, draining=True) == [True] * 3
    # Above the batch-size limit nothing speculates.
    assert not speculator.active(9, False)


def test_the_speculator_keeps_no_state_for_sequences_it_is_done_with():
    """Per-sequence bookkeeping ends with each step: a sequence without proposals leaves none, and
    one whose proposals the scheduler cut entirely is forgotten, blocks trimmed."""
    from engine.scheduling.kv_cache import KVCacheManager
    from engine.speculation.speculator import Speculator

    class ByRequest:
        def propose(self, requests, num_tokens):
            return [[] if r.request_id == "none" else [5, 6] for r in requests]

    kv_cache = KVCacheManager(16, 4)
    speculator = Speculator(SpeculativeConfig.parse({"num_speculative_tokens": 2}), kv_cache, ByRequest())
    requests = [Request(name, [1, 2, 3], SamplingParams(max_tokens=100)) for name in ("none", "cut")]
    for request in requests:
        request.status, request.num_computed_tokens = RequestStatus.RUNNING, 2
        assert kv_cache.allocate(request, 1 + 2)  # as a draft model allocates before proposing
    assert speculator.propose(requests) == [requests[1]]
    # The scheduler cut every proposal (its token budget ran out) and scheduled the last token alone.
    requests[1].spec_token_ids, requests[1].num_computed_tokens = [], 3
    speculator.drop_unscheduled([requests[1]])
    assert speculator._num_proposed == {}
    assert len(requests[1].block_ids) == 1  # positions 0-2 only: the proposals' block went back


def test_a_sequence_whose_proposals_keep_failing_gets_none_but_an_occasional_probe():
    from engine.scheduling.kv_cache import KVCacheManager
    from engine.speculation.speculator import PROBE_INTERVAL, Speculator

    class Fixed:
        def propose(self, requests, num_tokens):
            return [[9, 9] for _ in requests]

    speculator = Speculator(SpeculativeConfig.parse({"num_speculative_tokens": 2}), KVCacheManager(64, 4), Fixed())
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=1000))
    request.status, request.num_computed_tokens = RequestStatus.RUNNING, 2

    def step(target: list[int]) -> bool:
        """One speculative step whose target tokens are `target`; whether the sequence got proposals."""
        if not speculator.propose([request]):
            return False
        emitted = speculator.accept(request, request.spec_token_ids, target)
        request.output_token_ids += emitted
        request.num_computed_tokens = request.num_tokens - 1
        request.spec_token_ids = []
        return True

    assert all(step([9, 9, 4]) for _ in range(10))  # all accepted: it keeps getting them
    rejected = [step([5, 6, 7]) for _ in range(30)]  # all rejected from here
    assert all(rejected[:3]) and not all(rejected[3:])  # a few rejections pull the average under the bar
    gaps = [len(run) for run in "".join("x" if r else "." for r in rejected).split("x")[1:-1] if run]
    assert gaps and all(gap == PROBE_INTERVAL for gap in gaps)  # then one probe every PROBE_INTERVAL steps
    # Successful probes lift the average back over the bar: then proposals every step again.
    recovering = [step([9, 9, 4]) for _ in range(3 * PROBE_INTERVAL)]
    assert all(recovering[-PROBE_INTERVAL:]) and not all(recovering)
