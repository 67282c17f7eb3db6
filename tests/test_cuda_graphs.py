"""The decode-graph runner's buffers and bucketing, without CUDA graphs: "graphs" that replay by running the
captured function again, over the same static buffers a CUDA graph reads and writes. Oracle: the
engine's eager decode (greedy tokens must be identical) and the eager forward's logits.

The real capture runs on a GPU in tests/test_cuda.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot run")

from engine import LLM, SamplingParams  # noqa: E402
from engine.execution import cuda_graphs  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_BATCH = 5  # buckets 1, 2, 4, 5


class _EagerGraph:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.replay = fn


class _EagerCapturer:
    """Runs each function once at capture (as the real warm-up does) and again at every replay."""

    def __init__(self) -> None:
        self.captured = 0

    def capture(self, fn: Callable[[], None]) -> _EagerGraph:
        fn()
        self.captured += 1
        return _EagerGraph(fn)

    def finish(self) -> None:
        pass


@pytest.fixture(scope="module")
def engine_pair(model_dir_factory):
    """The same tiny model twice, eager, on the Triton backend; the second gets an eager-graph runner."""
    model_dir = str(model_dir_factory("qwen3"))
    # A short max_model_len: graphs attend over key ranges sized by it, and the interpreter is slow.
    settings = dict(
        device=DEVICE, attention_backend="triton", num_kv_blocks=32, max_num_seqs=MAX_BATCH, max_model_len=32
    )
    eager = LLM(model=model_dir, enforce_eager=True, **settings)
    graphed = LLM(model=model_dir, enforce_eager=True, **settings)
    runner = graphed.engine.runner
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_graphs, "_new_capturer", _EagerCapturer)
        runner.graph_runner = cuda_graphs.DecodeGraphRunner(runner, max_batch_size=MAX_BATCH)
        runner.graph_runner.capture()
    return eager, graphed


def test_every_bucket_shares_one_logits_buffer(engine_pair):
    _, graphed = engine_pair
    graphs = graphed.engine.runner.graph_runner
    assert sorted(graphs.graphs) == [1, 2, 4, 5]
    vocab = graphed.engine.runner.lm_head.weight.shape[0]
    assert graphs.logits is not None and graphs.logits.shape == (MAX_BATCH, vocab)
    # No other buffer of logits: the first version kept one per bucket, alive as long as its graph.
    held = [v for v in vars(graphs).values() if isinstance(v, torch.Tensor) and v.shape[-1:] == (vocab,)]
    assert len(held) == 1 and held[0] is graphs.logits


def test_replays_give_the_eager_logits_with_and_without_padding_rows(engine_pair):
    eager, graphed = engine_pair
    graphs = graphed.engine.runner.graph_runner
    for batch_size in (3,):  # replays bucket 4, with a padding row
        prompts = [[11 + i, 12 + i, 13 + 2 * i][: 1 + i % 3] for i in range(batch_size)]
        logits = []
        for llm in (eager, graphed):
            engine = llm.engine
            for i, prompt in enumerate(prompts):
                engine.add_request(f"b{batch_size}-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=2))
            engine.step()  # the prefill (eager in both), which samples each first token
            batch = engine.scheduler.schedule()  # the decode step of every sequence
            inputs = engine.runner.prepare(batch)
            assert inputs.is_decode_only
            if llm is graphed:
                with torch.inference_mode():  # as in the model runner, which calls it
                    logits.append(graphs.run(inputs).clone())
                    # A view of the shared buffer's first rows, not a buffer of its own.
                    assert graphs.run(inputs).data_ptr() == graphs.logits.data_ptr()
            else:
                logits.append(
                    engine.runner.forward(inputs.input_ids, inputs.positions, inputs.metadata, inputs.logits_indices)
                )
            for i in range(batch_size):
                engine.abort_request(f"b{batch_size}-{i}")
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_greedy_decoding_through_the_graphs_matches_eager_decoding(engine_pair):
    eager, graphed = engine_pair
    replays = [0]
    run = graphed.engine.runner.graph_runner.run

    def counting_run(inputs):
        replays[0] += 1
        return run(inputs)

    graphed.engine.runner.graph_runner.run = counting_run
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    assert got == expected
    assert replays[0] >= 2  # the decode steps went through the graphs
    stats = graphed.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_speculative_steps_replay_graphs_of_one_plus_k_token_rows(model_dir_factory):
    """Rows of 1 + k tokens, every position sampled: the graphs give the eager engine's tokens, and
    rows whose proposer found fewer than k tokens are padded so the step still has the graph's shape."""
    k = 2
    settings = dict(
        model=str(model_dir_factory("qwen3")),
        device=DEVICE,
        attention_backend="triton",
        num_kv_blocks=32,
        max_num_seqs=MAX_BATCH,
        max_model_len=32,
        enforce_eager=True,
        speculative_config={"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1},
    )
    eager, graphed = LLM(**settings), LLM(**settings)
    runner = graphed.engine.runner
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_graphs, "_new_capturer", _EagerCapturer)
        runner.spec_graph_runner = cuda_graphs.DecodeGraphRunner(runner, max_batch_size=MAX_BATCH, query_len=1 + k)
        runner.spec_graph_runner.capture()
    graphed.engine.speculator.pad_proposals = True
    graphs = runner.spec_graph_runner
    assert graphs.logits.shape[0] == MAX_BATCH * (1 + k)
    replays = []
    run = graphs.run
    graphs.run = lambda inputs: replays.append(inputs.layout.num_seqs) or run(inputs)

    proposer = graphed.engine.speculator.proposer
    propose, real = proposer.propose, []
    proposer.propose = lambda *args: real.extend(propose(*args)) or real[-len(args[0]) :]

    # Repeating prompts give the n-gram proposer something to find; one has no repeat at all.
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [20, 21, 22]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    assert got == expected
    assert replays and max(replays) == len(prompts)  # speculative steps of the whole batch replayed
    stats = graphed.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # Fillers are verified but not counted: the count is that of the proposer's own tokens.
    assert stats["spec_num_draft_tokens"] == sum(len(tokens) for tokens in real)
