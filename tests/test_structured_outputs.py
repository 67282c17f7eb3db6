"""Grammar-constrained decoding: on random-weight models only the constraint can make output valid."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import jsonschema
import pytest
import torch
from shared_specs import SCHEMAS

from engine import LLM, SamplingParams
from engine.sampling.structured_outputs import StructuredOutputsParams, apply_token_bitmask

needs_xgrammar = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")

PROMPTS = ["Give me JSON", "Héllo wörld, καλημέρα 世界", "{", "The quick brown fox", "1 2 3"]


@pytest.fixture(scope="module")
def llm(model_dir_factory):
    return LLM(
        model=str(model_dir_factory("qwen3")),
        device="cpu",
        dtype="float32",
        max_model_len=512,
        num_kv_blocks=96,
    )


def _all_blocks_free(llm: LLM) -> bool:
    stats = llm.stats()
    return stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0


def _greedy_and_sampled(constraint: StructuredOutputsParams, max_tokens: int) -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=constraint)
    sampled = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured_outputs=constraint)
        for seed in range(len(PROMPTS))
    ]
    return [greedy] * len(PROMPTS) + sampled


def _assert_compact(text: str) -> None:
    """No free whitespace: outside strings, only the single space after ':' and ','."""
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    for match in re.finditer(r"\s", skeleton):
        assert match.group() == " " and skeleton[match.start() - 1] in ":,", text


# ---- the params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({}, "set exactly one"),
        ({"json": {"type": "object"}, "regex": "a+"}, "json and regex"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": [1, 2]}, "must be a JSON object"),
        ({"choice": []}, "at least one"),
        ({"choice": "yes"}, "list of strings"),
        ({"regex": ""}, "non-empty"),
        ({"grammar": "  "}, "non-empty"),
    ],
)
def test_invalid_params_name_structured_outputs(kwargs, why):
    with pytest.raises(ValueError, match=rf"Invalid value for 'structured_outputs':.*{why}"):
        StructuredOutputsParams(**kwargs)


def test_schema_text_is_parsed_and_sampling_params_checks_the_type():
    assert StructuredOutputsParams(json='{"type": "integer"}').json == {"type": "integer"}
    with pytest.raises(ValueError, match="'structured_outputs'"):
        SamplingParams(structured_outputs={"json_object": True})


# ---- outputs valid by construction ----------------------------------------------------------------------


@needs_xgrammar
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate_and_stop(llm, name):
    schema = SCHEMAS[name]
    params = _greedy_and_sampled(StructuredOutputsParams(json=schema), max_tokens=120)
    outs = llm.generate(PROMPTS * 2, params)
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
        _assert_compact(completion.text)
    assert _all_blocks_free(llm)


@needs_xgrammar
def test_json_object_mode_outputs_objects(llm):
    constraint = StructuredOutputsParams(json_object=True)
    # About a quarter of the random model's sampled objects close within max_tokens: 15 samples
    # make "none does" a 1-in-75 event rather than the 1-in-4 of five.
    more = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=150, structured_outputs=constraint)
        for seed in range(5, 15)
    ]
    params = _greedy_and_sampled(constraint, max_tokens=150) + more
    outs = llm.generate(PROMPTS * 4, params)
    finished = [out.outputs[0] for out in outs if out.outputs[0].finish_reason == "stop"]
    assert finished, "no JSON object completed"
    for completion in finished:
        assert isinstance(json.loads(completion.text), dict)
        _assert_compact(completion.text)
    for out in outs:  # cut short or not, the output is on its way to an object
        assert out.outputs[0].text.startswith("{")


@needs_xgrammar
def test_regex_choice_and_grammar(llm):
    regex = r"[a-z]{2,6}-\d{2,4}"
    choices = ["yes", "no", "maybe so"]
    grammar = 'root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3}){0,3} ")"'
    cases = [
        (StructuredOutputsParams(regex=regex), lambda text: re.fullmatch(regex, text)),
        (StructuredOutputsParams(choice=choices), lambda text: text in choices),
        (
            StructuredOutputsParams(grammar=grammar),
            lambda text: re.fullmatch(r"\(\d{1,3}(\+\d{1,3}){0,3}\)", text),
        ),
    ]
    for constraint, valid in cases:
        outs = llm.generate(PROMPTS * 2, _greedy_and_sampled(constraint, max_tokens=40))
        for out in outs:
            completion = out.outputs[0]
            assert completion.finish_reason == "stop" and valid(completion.text), (
                constraint,
                completion.text,
            )


@needs_xgrammar
def test_each_of_n_samples_has_its_own_matcher(llm):
    schema = SCHEMAS["nested"]
    params = SamplingParams(
        n=4, temperature=1.0, seed=5, max_tokens=120, structured_outputs=StructuredOutputsParams(json=schema)
    )
    (out,) = llm.generate(PROMPTS[0], params)
    assert len(out.outputs) == 4 and len({c.text for c in out.outputs}) > 1
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), schema)


@needs_xgrammar
def test_the_grammar_ends_the_output_despite_min_tokens_and_ignore_eos(llm):
    constraint = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(
        temperature=0.0, min_tokens=30, ignore_eos=True, max_tokens=40, structured_outputs=constraint
    )
    (out,) = llm.generate(PROMPTS[0], params)
    assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop"


# ---- errors -------------------------------------------------------------------------------------------


@needs_xgrammar
@pytest.mark.parametrize(
    "constraint, why",
    [
        (StructuredOutputsParams(json={"type": "foo"}), 'invalid JSON schema: Unsupported type "foo"'),
        (
            StructuredOutputsParams(json={"type": "integer", "minimum": 5, "maximum": 2}),
            "invalid JSON schema",
        ),
        (StructuredOutputsParams(regex="(ab"), "invalid regex: .*parenthesis"),
        (StructuredOutputsParams(grammar='start ::= "a"'), 'invalid grammar: .*"root"'),
    ],
)
def test_invalid_constraint_is_refused_before_entering_the_engine(llm, constraint, why):
    with pytest.raises(ValueError, match=rf"Invalid value for 'structured_outputs': {why}") as error:
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs=constraint))
    assert ".cc:" not in str(error.value)  # xgrammar's C++ source location is not for users
    assert not llm.engine.has_unfinished_requests() and _all_blocks_free(llm)


def test_engine_runs_without_xgrammar_and_refuses_constraints_clearly(model_dir_factory, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    llm = LLM(model=str(model_dir_factory("qwen3")), device="cpu", max_model_len=128, num_kv_blocks=16)
    (out,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match=r"'structured_outputs'.*needs the xgrammar package"):
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)))
    assert _all_blocks_free(llm)


# ---- batching, preemption, logprobs, cache -----------------------------------------------------------


@needs_xgrammar
def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0.0, max_tokens=120, structured_outputs=StructuredOutputsParams(json=SCHEMAS["enum"])
    )
    (alone,) = llm.generate(PROMPTS[1], free)
    mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [constrained, free, constrained])
    assert mixed[1].outputs[0].token_ids == alone.outputs[0].token_ids
    for out in (mixed[0], mixed[2]):
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["enum"])


@needs_xgrammar
def test_logprobs_stay_those_of_the_raw_distribution(llm):
    constraint = StructuredOutputsParams(json=SCHEMAS["enum"])
    (free,) = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))
    (constrained,) = llm.generate(
        PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=60, logprobs=5, structured_outputs=constraint)
    )
    first_free, first_constrained = free.outputs[0].logprobs[0], constrained.outputs[0].logprobs[0]
    assert constrained.outputs[0].text.startswith("{")
    free_ids, free_values = zip(*first_free.top_logprobs)
    constrained_ids, constrained_values = zip(*first_constrained.top_logprobs)
    assert constrained_ids == free_ids and constrained_values == pytest.approx(free_values)
    assert first_constrained.logprob <= first_free.logprob  # "{" is allowed, not necessarily likely


@needs_xgrammar
def test_preemption_keeps_the_matcher_and_the_output(model_dir_factory):
    # 10 blocks of 16 tokens cannot hold six requests of ~80 tokens: the newest are preempted and
    # recomputed. Recompute replays K/V only, so the outputs equal those of a roomy run.
    constraint = StructuredOutputsParams(json=SCHEMAS["nested"])
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=80, structured_outputs=constraint)
        for i in range(6)
    ]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(6)]
    model = str(model_dir_factory("qwen3"))
    tight = LLM(model=model, device="cpu", max_model_len=128, num_kv_blocks=10, block_size=16)
    roomy = LLM(model=model, device="cpu", max_model_len=128, num_kv_blocks=64, block_size=16)
    tight_outs = tight.generate(prompts, params)
    roomy_outs = roomy.generate(prompts, params)
    assert tight.stats()["num_preemptions"] > 0
    for out, reference in zip(tight_outs, roomy_outs):
        assert out.outputs[0].token_ids == reference.outputs[0].token_ids
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["nested"])
    assert _all_blocks_free(tight)


@needs_xgrammar
def test_each_constraint_compiles_once(llm):
    params = SamplingParams(
        temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["a1", "b2"])
    )
    llm.generate(PROMPTS[:2], params)
    manager = llm.engine._grammar_manager
    size = manager.cache_size()
    llm.generate(PROMPTS[2:], params)
    same_choice = SamplingParams(
        temperature=1.0, max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["a1", "b2"])
    )
    llm.generate(PROMPTS[0], same_choice)
    assert manager.cache_size() == size


@needs_xgrammar
def test_torch_bitmask_op_matches_xgrammar_kernel():
    import xgrammar as xgr

    generator = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word is partly padding
    bitmask = torch.randint(-(2**31), 2**31 - 1, (6, 4), dtype=torch.int32, generator=generator)
    logits = torch.randn(5, vocab, generator=generator)
    for rows in ([0, 1, 2, 3, 4], [1, 3]):
        expected, actual = logits.clone(), logits.clone()
        xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=rows)
        apply_token_bitmask(actual, bitmask, rows)
        assert torch.equal(expected, actual) and torch.isinf(actual[rows]).any()
    assert torch.equal(actual[[0, 2, 4]], logits[[0, 2, 4]])  # rows not listed are left alone
