"""The engine on an NVIDIA GPU: Triton attention and CUDA-graphed decode keep greedy parity.

float32: exactly the token ids of transformers' own greedy `generate` on each prompt alone.
bfloat16: the same, except that the first divergence may fall on a near-tie of transformers'
logits (rounding in bf16 decides those); comparison stops there. Skipped without CUDA.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import AutoModelForCausalLM

if TYPE_CHECKING:
    from engine import LLM

# The engine is imported inside the tests: importing it pulls in triton (through torch._dynamo),
# and on a CPU the Triton tests collected after this module need TRITON_INTERPRET set first.

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: torch.cuda.is_available() is False"),
]

ARCHS = ["llama", "qwen2", "qwen3"]
PROMPT_LENGTHS = [3, 17, 40, 9, 64, 1, 25, 33, 50, 130]
MAX_TOKENS = 16
# Small caps keep CUDA-graph capture quick (buckets 1..16) and an explicit pool keeps each engine
# from profiling and taking 90% of the card.
ENGINE_SETTINGS = dict(device="cuda", attention_backend="triton", max_num_seqs=16, max_model_len=512)
NUM_KV_BLOCKS = 256
# A near-tie in bf16: transformers' top-2 logits at most this far apart, or at most a few bf16 steps
# at their magnitude: logits of size 8..16 are only representable to 1/16, and two bf16 forward
# passes that add in different orders land a few steps apart. (The tiny test models' top-2 gap is
# about 1 on average, so a wrong token still almost always fails.)
BF16_TIE_MARGIN = 0.05
BF16_TIE_STEPS = 4


def _random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids away from both ends of the vocabulary: no special tokens, so no prompt holds an EOS.
    return [[rng.randrange(10, vocab_size - 10) for _ in range(n)] for n in lengths]


def _transformers_greedy(
    model_dir, prompts: list[list[int]], dtype: torch.dtype
) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Per prompt alone: transformers' greedy ids and the raw logits of each step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
    eos = model.generation_config.eos_token_id
    results = []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt], device="cuda"),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=eos,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ids = out.sequences[0, len(prompt) :].tolist()
        results.append((ids, [step[0].float().cpu() for step in out.logits]))
    del model
    torch.cuda.empty_cache()
    return results


def _engine(model_dir, dtype: str, **overrides) -> LLM:
    from engine import LLM

    settings = {**ENGINE_SETTINGS, "num_kv_blocks": NUM_KV_BLOCKS, **overrides}
    llm = LLM(model=str(model_dir), dtype=dtype, **settings)
    runner = llm.engine.runner
    assert runner.backend == "triton"
    assert runner.graph_runner is not None, "CUDA graphs should be on by default on CUDA"
    return llm


def _count_graph_replays(llm: LLM) -> list[int]:
    """Counts decode steps that replayed a CUDA graph (so the test proves graphs ran)."""
    counter = [0]
    graph_runner = llm.engine.runner.graph_runner
    run = graph_runner.run

    def counting_run(*args, **kwargs):
        counter[0] += 1
        return run(*args, **kwargs)

    graph_runner.run = counting_run
    return counter


def _engine_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    from engine import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outputs]


def _all_blocks_free(llm: LLM) -> bool:
    stats = llm.stats()
    return stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, model_dir_factory):
    model_dir = model_dir_factory(request.param)
    vocab_size = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    prompts = _random_prompts(vocab_size, PROMPT_LENGTHS, seed=len(request.param))
    return model_dir, prompts


@pytest.fixture(scope="module")
def float32_expected(arch_case):
    model_dir, prompts = arch_case
    return [ids for ids, _ in _transformers_greedy(model_dir, prompts, torch.float32)]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="one-batch"),  # async scheduling, the CUDA default
        pytest.param({"async_scheduling": False}, id="one-batch-sync"),
        # 12 blocks of 16 tokens hold the longest request (146 tokens) but nowhere near all ten, and
        # a 32-token budget splits the long prompts: preemption and chunked prefill on the GPU too.
        pytest.param(
            {"num_kv_blocks": 12, "max_num_batched_tokens": 32, "enable_prefix_caching": False},
            id="preempt-and-chunk",
        ),
    ],
)
def test_float32_greedy_matches_transformers_exactly(arch_case, float32_expected, overrides):
    model_dir, prompts = arch_case
    llm = _engine(model_dir, "float32", **overrides)
    replays = _count_graph_replays(llm)
    got = _engine_greedy(llm, prompts)
    for index, (engine_ids, expected_ids) in enumerate(zip(got, float32_expected)):
        assert engine_ids == expected_ids, f"prompt {index} (length {len(prompts[index])}) diverges"
    assert replays[0] > 0, "no decode step replayed a CUDA graph"
    if "num_kv_blocks" in overrides:
        assert llm.stats()["num_preemptions"] > 0
    assert _all_blocks_free(llm)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_float32_greedy_matches_transformers_and_replays_the_1_plus_k_graphs(
    arch_case, float32_expected, method
):
    """Speculation on the GPU: verification rows through the captured 1 + k graphs (proposals padded
    to k), async scheduling on (the CUDA default), and still transformers' greedy tokens."""
    model_dir, prompts = arch_case
    speculative = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": 64}
    if method == "draft_model":
        speculative["model"] = str(model_dir)  # the target as its own draft: every proposal accepted
    llm = _engine(model_dir, "float32", speculative_config=speculative)
    runner = llm.engine.runner
    assert runner.spec_graph_runner is not None and llm.engine.speculator.pad_proposals
    replays = [0]
    run = runner.spec_graph_runner.run

    def counting_run(*args, **kwargs):
        replays[0] += 1
        return run(*args, **kwargs)

    runner.spec_graph_runner.run = counting_run
    got = _engine_greedy(llm, prompts)
    for index, (engine_ids, expected_ids) in enumerate(zip(got, float32_expected)):
        assert engine_ids == expected_ids, f"prompt {index} (length {len(prompts[index])}) diverges"
    assert replays[0] > 0, "no speculative step replayed a CUDA graph"
    stats = llm.stats()
    assert stats["spec_num_draft_tokens"] > 0
    if method == "draft_model":
        assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"], stats
    assert _all_blocks_free(llm)


def _bf16_step(value: float) -> float:
    """The spacing of bf16 numbers around value (8 significant bits)."""
    exponent = torch.frexp(torch.tensor(abs(value) or 1.0)).exponent.item()
    return 2.0 ** (exponent - 8)


def test_bfloat16_greedy_matches_transformers_up_to_a_near_tie(arch_case):
    model_dir, prompts = arch_case
    reference = _transformers_greedy(model_dir, prompts, torch.bfloat16)
    llm = _engine(model_dir, "bfloat16")
    got = _engine_greedy(llm, prompts)
    divergences = 0
    for index, (engine_ids, (expected_ids, logits)) in enumerate(zip(got, reference)):
        first_diff = next(
            (j for j, (a, b) in enumerate(zip(engine_ids, expected_ids)) if a != b),
            None,
        )
        if first_diff is None:
            # Same ids as far as both go; they may only differ in length by an EOS-free run.
            assert len(engine_ids) == len(expected_ids), f"prompt {index}: lengths differ without a divergence"
            continue
        divergences += 1
        step_logits = logits[first_diff]
        top2 = torch.topk(step_logits, 2)
        gap = (top2.values[0] - top2.values[1]).item()
        margin = max(BF16_TIE_MARGIN, BF16_TIE_STEPS * _bf16_step(top2.values[0].item()))
        chosen = engine_ids[first_diff]
        assert chosen in top2.indices.tolist(), (
            f"prompt {index}, step {first_diff}: the engine chose token {chosen}, "
            f"outside transformers' top 2 {top2.indices.tolist()}"
        )
        assert gap <= margin, (
            f"prompt {index}, step {first_diff}: diverged where transformers' top-2 logits differ "
            f"by {gap:.4f} (a near-tie is at most {margin:.4f})"
        )
    # Rounding may break a tie now and then, but most prompts must agree all the way.
    assert divergences <= len(prompts) // 2, f"{divergences} of {len(prompts)} prompts diverged"
    assert _all_blocks_free(llm)


def test_every_block_is_free_after_requests_finish_or_abort(model_dir_factory):
    from engine import SamplingParams

    model_dir = model_dir_factory("qwen3")
    llm = _engine(model_dir, "bfloat16", num_kv_blocks=64)
    engine = llm.engine
    vocab_size = engine.vocab_size
    prompts = _random_prompts(vocab_size, [5, 40, 70, 18, 33, 2, 90, 12], seed=3)
    shared = prompts[2][:48]
    # n > 1 shares the prompt's blocks; a shared prefix hits the prefix cache.
    llm.generate(prompts, SamplingParams(temperature=1.0, seed=1, max_tokens=20, n=2))
    for suffix in ([11, 12], [13]):  # one after the other, so the second finds the first's blocks
        llm.generate(shared + suffix, SamplingParams(temperature=0.0, max_tokens=8))
    assert llm.stats()["prefix_cache_hit_tokens"] > 0
    assert _all_blocks_free(llm)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"abort-{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    for i in range(0, len(prompts), 2):
        engine.abort_request(f"abort-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    assert _all_blocks_free(llm)


def test_launching_a_decode_step_never_waits_for_the_gpu(model_dir_factory):
    """Step preparation, the in-flight token gather, graph replay, sampling and the copy of the tokens
    to the host all queue work without waiting for the GPU (issue 4): the host waits only when it
    reads a step's tokens, and with async scheduling that is after the next step is queued."""
    from engine import SamplingParams
    from engine.sampling.sampler import SamplingRow

    llm = _engine(model_dir_factory("qwen3"), "bfloat16")
    engine = llm.engine
    assert engine.async_scheduling
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=8, seed=3, logprobs=2)
    for i in range(4):
        engine.add_request(f"sync-{i}", [11 + i] * (5 + i), params)
    engine.step()  # launches the prefill
    engine.step()  # launches the first decode, reads the prefill's tokens
    runner = engine.runner
    batch = engine.scheduler.schedule()
    assert all(r.num_inflight_tokens == 1 for r in batch.requests)  # input ids come from the device
    penalized = SamplingParams(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, logprobs=3)
    penalty_rows = [SamplingRow(penalized, [5, 6, 7], [8, 9]) for _ in range(4)]
    logits = torch.randn(4, engine.vocab_size, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = runner.launch_sampling(runner.launch_forward(batch))
        runner.sampler(logits, penalty_rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(launched.result().token_ids) == 4


def test_json_schema_outputs_on_the_gpu(model_dir_factory):
    """The grammar bitmask applied on the device (xgrammar's kernel), with free requests in the same
    batches; needs xgrammar (carried to the GPU machine as a wheel by benchmarks/fetch_gpu_wheels.sh)."""
    pytest.importorskip("xgrammar")
    import json

    from shared_specs import SCHEMAS

    from engine import SamplingParams
    from engine.sampling.structured_outputs import StructuredOutputsParams

    llm = _engine(model_dir_factory("qwen3"), "bfloat16")
    schema = SCHEMAS["nested"]
    constrained = [
        SamplingParams(
            temperature=1.0, seed=seed, max_tokens=120, structured_outputs=StructuredOutputsParams(json=schema)
        )
        for seed in range(4)
    ]
    free = SamplingParams(temperature=1.0, seed=9, max_tokens=30, ignore_eos=True)
    outputs = llm.generate(["Give me JSON", "{", "x", "1 2", "free"], [*constrained, free])
    for output in outputs[:4]:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        value = json.loads(completion.text)
        assert set(value) <= {"user", "active"} and set(value["user"]) == {"name", "age"}
        assert 1 <= len(value["user"]["name"]) <= 8 and 0 <= value["user"]["age"] <= 120
    assert len(outputs[4].outputs[0].token_ids) == 30
    assert _all_blocks_free(llm)


def test_decode_graphs_share_one_logits_buffer(model_dir_factory):
    """Graphs for 20 batch buckets hold one bucket's worth of logits: one buffer per bucket came to
    about 666 MB at Qwen's vocabulary in bf16 (issue 9), more than the KV sizing's headroom."""
    from engine import LLM, SamplingParams
    from engine.execution.cuda_graphs import DecodeGraphRunner

    vocab, max_batch = 151_936, 256
    settings = {**ENGINE_SETTINGS, "max_num_seqs": max_batch, "num_kv_blocks": NUM_KV_BLOCKS}
    llm = LLM(model=str(model_dir_factory("qwen3", vocab_size=vocab)), dtype="bfloat16", enforce_eager=True, **settings)
    runner = llm.engine.runner
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    graphs = DecodeGraphRunner(runner, max_batch_size=max_batch)
    graphs.capture()
    torch.cuda.synchronize()
    one_buffer = max_batch * vocab * 2  # bytes of the largest bucket's bf16 logits
    assert len(graphs.graphs) == 20
    held = torch.cuda.memory_allocated() - allocated
    pooled = torch.cuda.memory_reserved() - reserved
    assert held < 2 * one_buffer, f"graphs hold {held / 2**20:.0f} MiB"
    assert pooled < 4 * one_buffer, f"graph capture reserved {pooled / 2**20:.0f} MiB"
    # And they decode what the eager steps decode.
    prompts = [[11, 12, 13], [14, 15], [16]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eager = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    runner.graph_runner = graphs
    replays = _count_graph_replays(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == eager
    assert replays[0] > 0
