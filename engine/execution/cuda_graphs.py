"""CUDA graphs for decode-only steps.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
cost. Graphs are captured at bucketed batch sizes over static input buffers; a step of n sequences
replays the smallest bucket >= n, with padding rows that write to no KV slot. Prefill and mixed
steps run eagerly.

A runner serves one query length q per sequence: q = 1 for plain decode, q = 1 + k for speculative
steps where every row verifies k proposals (every one of its q positions is sampled).

Only the Triton attention backend can be captured: it never syncs with the host and sizes its
grid from upper bounds.

Every graph writes its logits into the first rows of one shared buffer: a graph's own output
stays allocated in the graph pool as long as the graph lives, and one per bucket came to about
666 MB at Qwen3's vocabulary (20 buckets), more than the KV sizing's headroom. Each graph copies
its logits there (about 40 us at 256 rows of 151,936) and lets its own output go, so the pool
reuses that memory for the next, smaller graph. Sharing is safe because the logits of a step are
sampled (on the same stream) before the next step's graph is replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from engine.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from engine.execution.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class DecodeGraphRunner:
    def __init__(self, runner: ModelRunner, max_batch_size: int, query_len: int = 1) -> None:
        self.runner = runner
        self.query_len = query_len
        self.buckets = batch_size_buckets(min(max_batch_size, 512))
        self.max_batch_size = self.buckets[-1]
        device = runner.device
        size = self.max_batch_size
        num_tokens = size * query_len
        self.input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(num_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(0, num_tokens + 1, query_len, dtype=torch.int32, device=device)
        self.seq_lens = torch.full((size,), query_len, dtype=torch.int32, device=device)
        # As wide as any step's table (the model runner rounds widths up to multiples of 16).
        width = -(-runner.max_blocks_per_seq // 16) * 16
        self.block_tables = torch.zeros(size, width, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(num_tokens, dtype=torch.long, device=device)
        self.graphs: dict[int, _Replayable] = {}
        # [max_batch_size * query_len, vocab]: every graph's output rows.
        self.logits: torch.Tensor | None = None

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch_size and bool(self.graphs)

    def fits(self, inputs: StepInputs) -> bool:
        """Whether a step has this runner's shape: every row query_len tokens, each one sampled."""
        layout = inputs.layout
        return (
            layout.num_tokens == layout.num_sampled == layout.num_seqs * self.query_len
            and inputs.prompt_rows is None
            and self.can_run(layout.num_seqs)
        )

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        num_tokens = batch_size * self.query_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            max_query_len=self.query_len,
            max_seq_len=self.runner.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        if self.runner.backend != "triton":
            logger.info("CUDA graphs need the Triton attention backend; decode runs eagerly")
            return
        capturer = _new_capturer()
        # Largest first: the shared logits buffer takes the largest graph's shape, and smaller
        # graphs reuse the largest one's memory pool.
        for size in reversed(self.buckets):
            self.graphs[size] = capturer.capture(lambda size=size: self._forward_into_shared_logits(size))
        capturer.finish()
        logger.info("Captured CUDA graphs for %d-token rows at batch sizes %s", self.query_len, self.buckets)

    def _forward_into_shared_logits(self, size: int) -> None:
        num_tokens = size * self.query_len
        logits = self.runner.forward(
            self.input_ids[:num_tokens],
            self.positions[:num_tokens],
            self._metadata(size),
            self.logits_indices[:num_tokens],
        )
        if self.logits is None:  # the first call: the largest bucket's warm-up, outside any capture
            assert size == self.max_batch_size
            self.logits = torch.empty_like(logits)
        self.logits[:num_tokens].copy_(logits)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        n = inputs.layout.num_seqs
        size = next(b for b in self.buckets if b >= n)
        num_tokens, padded_tokens = n * self.query_len, size * self.query_len
        metadata = inputs.metadata
        self.input_ids[:num_tokens].copy_(inputs.input_ids)
        self.positions[:num_tokens].copy_(inputs.positions)
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(metadata.block_tables)
        if size > n:
            # Padding rows: attend to stale slots of block 0 (as many as their queries) and write nothing.
            self.slot_mapping[num_tokens:padded_tokens].fill_(-1)
            self.seq_lens[n:size].fill_(self.query_len)
            self.block_tables[n:size, 0].fill_(0)
        self.graphs[size].replay()
        return self.logits[:num_tokens]


class _Replayable(Protocol):
    def replay(self) -> None: ...


class _CudaGraphCapturer:
    """Captures callables into CUDA graphs that share one memory pool."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            fn()  # warm-up: compiles kernels, settles the allocator
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph

    def finish(self) -> None:
        torch.cuda.synchronize()


def _new_capturer() -> _CudaGraphCapturer:
    # A function of its own so that CPU tests can capture "graphs" that replay eagerly.
    return _CudaGraphCapturer()
