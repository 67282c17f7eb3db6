"""Packs a scheduled step into tensors, runs the transformers model over the paged KV cache, samples.

One step is one packed batch [1, T] with position_ids; the attention metadata reaches our paged
attention through the forward context. The LM head runs only on the rows that will be sampled.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata, ForwardContext, forward_context
from engine.config import EngineConfig
from engine.execution.loader import LoadedModel
from engine.execution.transfers import host_to_device, to_pinned_host
from engine.outputs import TokenLogprob
from engine.sampling.prompt_logprobs import LaunchedPromptLogprobs, PromptLogprobRows, find_prompt_rows
from engine.sampling.sampler import Sampler, SamplerOutput, SamplingRow, unpack_logprobs
from engine.sampling.sampling_params import SamplingParams
from engine.scheduling.request import Request
from engine.scheduling.scheduler import ScheduledBatch
from engine.speculation.config import SpeculativeConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class StepResult:
    sampled_requests: list[Request]  # the requests that got a new token, in batch order
    # One token per sampled position, in batch order: a request with k proposals has k + 1 of them.
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None
    # (request, first prompt position, logprobs of the prompt tokens from there) for requests that ask.
    prompt_logprobs: list[tuple[Request, int, list[TokenLogprob]]] | None = None
    # Per sampled request, the proposals this step verified ([] for most); None: no proposals at all.
    proposed: list[list[int]] | None = None


class LaunchedStep:
    """A step queued on the device. Its sampled tokens are copied to pinned host memory behind it,
    so reading them (`result`) waits for this step only, not for steps queued after it."""

    def __init__(
        self,
        sampled_requests: list[Request],
        output: SamplerOutput | None = None,
        prompt_logprobs: LaunchedPromptLogprobs | None = None,
        proposed: list[list[int]] | None = None,
    ) -> None:
        self.sampled_requests = sampled_requests
        self.proposed = proposed
        self._num_logprobs = output.num_logprobs if output is not None else []
        self._host_tokens: torch.Tensor | None = None
        self._host_logprobs: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self._prompt_logprobs = prompt_logprobs
        if output is None:
            if prompt_logprobs is not None and prompt_logprobs.on_cuda:
                self._ready = torch.cuda.Event()  # its copy to the host was queued behind the forward
                self._ready.record()
            return
        if output.token_ids.device.type == "cuda":
            self._host_tokens = to_pinned_host(output.token_ids)
            if output.packed_logprobs is not None:
                self._host_logprobs = to_pinned_host(output.packed_logprobs)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host_tokens = output.token_ids
            self._host_logprobs = output.packed_logprobs

    def result(self) -> StepResult:
        if self._ready is not None:
            self._ready.synchronize()
        prompt_logprobs = self._prompt_logprobs.result() if self._prompt_logprobs is not None else None
        if self._host_tokens is None:
            return StepResult([], [], None, prompt_logprobs)
        logprobs = None
        if self._host_logprobs is not None:
            logprobs = unpack_logprobs(self._host_logprobs.tolist(), self._num_logprobs)
        return StepResult(self.sampled_requests, self._host_tokens.tolist(), logprobs, prompt_logprobs, self.proposed)


@dataclass
class LaunchedForward:
    """A step's forward pass queued on the device: the logits of its sampled rows, to sample next."""

    sampled_requests: list[Request]
    logits: torch.Tensor | None  # [S, V] on the device; None when the step samples nothing
    prompt_logprobs: LaunchedPromptLogprobs | None = None
    proposed: list[list[int]] | None = None  # as in StepResult


@dataclass
class StepLayout:
    """The sizes of the parts of a step's packed inputs: all a tensor-parallel worker needs, besides
    the packed tensor itself, to rebuild the step (`unpack_step`)."""

    num_tokens: int
    num_sampled: int  # rows whose logits are computed: one per sampled request, plus its proposals
    num_inflight: int  # decode rows whose input id is copied on the device from the last step's tokens
    num_seqs: int
    max_blocks: int
    max_query_len: int
    max_seq_len: int

    def to_fields(self) -> list[int]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_fields(cls, fields: list[int]) -> StepLayout:
        return cls(*fields[: len(dataclasses.fields(cls))])


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the batch whose next token is sampled
    sampled_requests: list[Request]
    is_decode_only: bool
    layout: StepLayout
    # The step's inputs as one int32 tensor on the device, what a TP worker receives (`unpack_step`).
    packed: torch.Tensor
    prompt_rows: PromptLogprobRows | None = None  # rows whose logits give prompt logprobs
    proposed: list[list[int]] | None = None  # per sampled request its proposals; None: no proposals


def unpack_step(
    packed: torch.Tensor, layout: StepLayout, with_host_lists: bool
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, torch.Tensor]:
    """(input_ids, positions, metadata, logits_indices, inflight) as views of the packed tensor.

    Layout: int64 parts reinterpreted as int32 pairs (input ids, positions, slot mapping, logits
    indices, then the in-flight rows' positions and source rows), then the int32 parts (query
    starts, sequence lengths, block tables). One tensor: one host-to-device copy, one broadcast.
    `with_host_lists` copies query starts and sequence lengths to the host (the torch reference
    attention loops over them), which syncs on a GPU."""
    num_seqs = layout.num_seqs
    views = [packed[start : start + length] for start, length in _section_spans(layout)]
    input_ids, positions, slots, logits_indices, inflight = (view.view(torch.int64) for view in views[:5])
    query_start_loc, seq_lens, block_tables = views[5:]
    metadata = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables.view(num_seqs, layout.max_blocks),
        max_query_len=layout.max_query_len,
        max_seq_len=layout.max_seq_len,
        query_start_loc_host=query_start_loc.tolist() if with_host_lists else None,
        seq_lens_host=seq_lens.tolist() if with_host_lists else None,
    )
    return input_ids, positions, metadata, logits_indices, inflight


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, shared_kv_bytes_per_block: int = 0) -> None:
        """shared_kv_bytes_per_block: the bytes of other KV caches indexed by this pool's block ids
        (a draft model's), which the memory budget must hold along with each of this cache's blocks."""
        self.model = loaded.model
        self.shared_kv_bytes_per_block = shared_kv_bytes_per_block
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        self.max_model_len = loaded.max_model_len
        text_config = self.model.config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        # Under tensor parallelism, this rank's attention sees (and caches) its own KV heads only.
        self.parallel = loaded.parallel
        tp_size = self.parallel.world_size if self.parallel is not None else 1
        self.num_kv_heads = (text_config.num_key_value_heads or text_config.num_attention_heads) // tp_size
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.backend = _pick_backend(config.attention_backend, self.device)
        fused_sampler = False
        if self.backend == "triton":
            from engine.kernels.install import install_fused_kernels
            from engine.kernels.sampling import gumbel_argmax_works

            install_fused_kernels(self.model)
            fused_sampler = gumbel_argmax_works(self.device)
        self.base_model = self.model.base_model
        self.lm_head = self.model.get_output_embeddings()
        vocab_size = text_config.vocab_size
        if loaded.tokenizer is not None:
            vocab_size = min(vocab_size, len(loaded.tokenizer))
        self.sampler = Sampler(vocab_size, fused=fused_sampler)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graph_runner = None  # CUDA graphs of decode steps
        self.spec_graph_runner = None  # CUDA graphs of speculative steps (1 + k tokens per row)
        # The last launched step's sampled tokens, still on the device, and each request's row in
        # them: the next step reads the input ids of tokens still in flight from here.
        self._last_sampled: torch.Tensor | None = None
        self._last_sampled_rows: dict[Request, int] = {}
        self.num_kv_blocks = self._size_kv_cache(config)
        if self.parallel is not None:  # rank 0's block tables index every rank's cache
            self.num_kv_blocks = self.parallel.min_over_ranks(self.num_kv_blocks)
        self._allocate_kv_cache(self.num_kv_blocks)
        # Rank 0 of a tensor-parallel engine sends each step's inputs to the workers (set by the engine).
        self.step_sender = None
        logger.info(
            "KV cache: %d blocks of %d tokens, %.2f GiB (%s attention)",
            self.num_kv_blocks,
            self.block_size,
            self.num_kv_blocks * self.bytes_per_block / 2**30,
            self.backend,
        )
        if self.device.type == "cuda" and not config.enforce_eager:
            from engine.execution.cuda_graphs import DecodeGraphRunner

            # Under tensor parallelism every rank captures here, at the same sizes in the same order
            # (the model's all-reduces are inside the graphs), and rank 0 tells the workers which
            # steps replay a graph.
            self.graph_runner = DecodeGraphRunner(self, max_batch_size=config.max_num_seqs)
            self.graph_runner.capture()
            speculative = SpeculativeConfig.parse(config.speculative_config)
            if speculative is not None:
                # Rows of 1 + k tokens (the speculator pads every row's proposals to k when these exist).
                # Up to the batch that speculates, and at most 64: the shared logits buffer holds
                # batch * (1 + k) rows of the vocabulary.
                max_batch = min(config.max_num_seqs, speculative.batch_size_limit(self.device.type), 64)
                query_len = 1 + speculative.num_speculative_tokens
                self.spec_graph_runner = DecodeGraphRunner(self, max_batch_size=max_batch, query_len=query_len)
                self.spec_graph_runner.capture()

    @property
    def bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size

    # ---- memory -------------------------------------------------------------------------------

    def _size_kv_cache(self, config: EngineConfig) -> int:
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if self.device.type != "cuda":
            budget = config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
            return max(1, budget // (self.bytes_per_block + self.shared_kv_bytes_per_block))
        return self._profile_cuda_blocks(config)

    def _profile_cuda_blocks(self, config: EngineConfig) -> int:
        """Blocks that fit in gpu_memory_utilization of the card after a forward at the largest batch."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = config.max_num_batched_tokens
        num_seqs = max(1, min(config.max_num_seqs, num_tokens))
        profile_blocks = num_seqs * self.max_blocks_per_seq
        profile_blocks = min(profile_blocks, -(-num_tokens // self.block_size) + num_seqs)
        self._allocate_kv_cache(profile_blocks)
        self._profile_forward(num_tokens, num_seqs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - profile_blocks * self.bytes_per_block
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        in_use_elsewhere = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * config.gpu_memory_utilization - peak - in_use_elsewhere
        # CUDA graphs and allocator fragmentation need headroom beyond the measured peak.
        budget -= 512 * 2**20
        num_blocks = int(budget // (self.bytes_per_block + self.shared_kv_bytes_per_block))
        if num_blocks < 1:
            raise RuntimeError(
                f"No GPU memory left for the KV cache (peak {peak / 2**30:.2f} GiB of {total / 2**30:.2f} GiB); "
                "raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        logger.info("Profiled peak activation memory %.2f GiB", peak / 2**30)
        return num_blocks

    def _profile_forward(self, num_tokens: int, num_seqs: int) -> None:
        """A dummy forward of num_tokens tokens over num_seqs sequences, plus sampling of each."""
        lengths = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        lengths = [max(1, length) for length in lengths]
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        total = starts[-1]
        # As wide as a step's table can be, so that the kernel versions compiled here serve the steps.
        width = _round_up(self.max_blocks_per_seq, 16)
        block_tables = torch.zeros(num_seqs, width, dtype=torch.int32, device=self.device)
        metadata = AttentionMetadata(
            slot_mapping=torch.full((total,), -1, dtype=torch.int64, device=self.device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
            block_tables=block_tables,
            max_query_len=max(lengths),
            max_seq_len=max(lengths),
            query_start_loc_host=starts,
            seq_lens_host=lengths,
        )
        input_ids = torch.zeros(total, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        logits_indices = torch.tensor(starts[1:], device=self.device) - 1
        logits = self.forward(input_ids, positions, metadata, logits_indices)
        rows = [SamplingRow(_PROFILE_PARAMS, [0], [], None) for _ in range(num_seqs)]
        self.sampler(logits, rows)

    def resize_kv_cache(self, num_blocks: int) -> None:
        """A cache of num_blocks blocks in place of the current one (a draft model's takes the
        target's block count, known once the target has sized its own)."""
        self.kv_caches = []
        self.num_kv_blocks = num_blocks
        self._allocate_kv_cache(num_blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # Zeros, not empty: attention kernels multiply masked-out V rows by 0, and 0 * NaN is NaN.
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.num_layers)
        ]

    # ---- one step -----------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's tensors, built with numpy on the host and sent in one copy (`unpack_step`).

        This runs every step while the GPU waits, so it avoids per-element Python work where it can.
        """
        num_seqs = len(batch)
        num_new = np.fromiter(batch.num_new_tokens, dtype=np.int64, count=num_seqs)
        starts = np.fromiter(batch.starts, dtype=np.int64, count=num_seqs)
        ends = starts + num_new
        num_tokens = int(num_new.sum())
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])

        token_ids: list[int] = []
        sampled: list[Request] = []
        sampled_rows: list[int] = []
        proposed: list[list[int]] = []  # per sampled request, the proposals it verifies
        # Tokens sampled by the previous step and not yet read by the host: their input ids are
        # copied on the device from that step's output (positions in this batch, rows in that output).
        inflight_positions: list[int] = []
        inflight_sources: list[int] = []
        for row, (request, start, end) in enumerate(zip(batch.requests, starts.tolist(), ends.tolist())):
            num_known = request.num_tokens
            if start >= num_known:  # a decode of the token in flight (the scheduler gives it alone)
                inflight_positions.append(len(token_ids))
                inflight_sources.append(self._last_sampled_rows[request])
                token_ids.append(0)
            elif end - start == 1 and start >= request.num_prompt_tokens:
                token_ids.append(request.output_token_ids[start - request.num_prompt_tokens])
            elif end > num_known:  # the last token, then the proposals to verify after it
                assert start == num_known - 1 and end - num_known == len(request.spec_token_ids), request.request_id
                token_ids.extend(request.token_ids_in(start, num_known))
                token_ids.extend(request.spec_token_ids)
            else:
                token_ids.extend(request.token_ids_in(start, end))
            if end >= num_known + request.num_inflight_tokens:
                sampled.append(request)
                sampled_rows.append(row)
                proposed.append(list(request.spec_token_ids) if end > num_known else [])
        any_proposed = any(proposed)
        logits_indices = query_start_loc[1:][sampled_rows] - 1
        if any_proposed:
            # A row with k proposals samples its last k + 1 positions: each proposal's and the one after.
            counts = np.fromiter((1 + len(p) for p in proposed), dtype=np.int64, count=len(proposed))
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            logits_indices = np.repeat(logits_indices - counts + 1, counts) + within

        block_counts = [len(r.block_ids) for r in batch.requests]
        # The width is the kernels' row stride: a multiple of 16 keeps Triton's specialization of it
        # (divisible by 16, or 1) the same in every step, so no step compiles a new kernel version.
        table_width = _round_up(max(block_counts), 16)
        block_tables = np.zeros((num_seqs, table_width), dtype=np.int32)
        for row, request in enumerate(batch.requests):
            block_tables[row, : block_counts[row]] = request.block_ids

        row_of_token = np.repeat(np.arange(num_seqs), num_new)
        positions = np.arange(num_tokens, dtype=np.int64) + (starts - query_start_loc[:-1])[row_of_token]
        slot_mapping = (
            block_tables[row_of_token, positions // self.block_size].astype(np.int64) * self.block_size
            + positions % self.block_size
        )

        num_inflight = len(inflight_positions)
        layout = StepLayout(
            num_tokens=num_tokens,
            num_sampled=len(logits_indices),
            num_inflight=num_inflight,
            num_seqs=num_seqs,
            max_blocks=table_width,
            max_query_len=int(num_new.max()),
            max_seq_len=int(ends.max()),
        )
        sections = [
            np.asarray(token_ids, dtype=np.int64),
            positions,
            slot_mapping,
            logits_indices,
            np.asarray(inflight_positions + inflight_sources, dtype=np.int64),
            query_start_loc.astype(np.int32),
            ends.astype(np.int32),
            block_tables.ravel(),
        ]
        packed = host_to_device(torch.from_numpy(_pack_aligned(sections, _section_spans(layout))), self.device)
        input_ids, positions_d, metadata, logits_d, inflight_d = unpack_step(packed, layout, with_host_lists=False)
        if num_inflight:  # written before any reader: the forward, and a TP broadcast of `packed`
            input_ids.index_copy_(
                0, inflight_d[:num_inflight], self._last_sampled.index_select(0, inflight_d[num_inflight:])
            )
        metadata.query_start_loc_host = query_start_loc.tolist()
        metadata.seq_lens_host = ends.tolist()
        return StepInputs(
            input_ids=input_ids,
            positions=positions_d,
            metadata=metadata,
            logits_indices=logits_d,
            sampled_requests=sampled,
            # Every row decodes one token and is sampled: the shape a captured CUDA graph expects.
            is_decode_only=num_tokens == num_seqs == len(sampled),
            proposed=proposed if any_proposed else None,
            layout=layout,
            packed=packed,
            prompt_rows=find_prompt_rows(batch.requests, starts.tolist(), ends.tolist(), query_start_loc[:-1].tolist())
            if any(r.params.prompt_logprobs is not None for r in batch.requests)
            else None,
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states of the packed batch, then logits [S, V] of the sampled rows only."""
        return self.lm_head(self.hidden_states(input_ids, positions, metadata)[logits_indices])

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata):
        context = ForwardContext(metadata=metadata, kv_caches=self.kv_caches, backend=self.backend)
        with forward_context(context):
            return self.base_model(
                input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False
            ).last_hidden_state[0]

    @staticmethod
    def sampler_row(request: Request) -> SamplingRow:
        return SamplingRow(
            request.params, request.prompt_token_ids, request.output_token_ids, request.seed, request.grammar
        )

    @torch.inference_mode()
    def launch_forward(self, batch: ScheduledBatch) -> LaunchedForward:
        """Queue the step's forward pass on the device; never waits for the device.

        Decode rows whose previous token is still in flight read it from the previous step's
        sampled tokens on the device, so this may run before the host has read them.
        """
        inputs = self.prepare(batch)
        graph = self.graph_for(inputs)
        if self.step_sender is not None:  # the workers run this same forward on their shards
            graph_code = 0 if graph is None else 1 if graph is self.graph_runner else 2
            self.step_sender.send([*inputs.layout.to_fields(), graph_code], inputs.packed)
        if inputs.prompt_rows is not None:
            # The LM head also runs on the prompt rows of requests that asked for prompt logprobs.
            # (Refused under tensor parallelism: the workers would have to mirror these LM-head calls.)
            hidden = self.hidden_states(inputs.input_ids, inputs.positions, inputs.metadata)
            prompt_logprobs = LaunchedPromptLogprobs(inputs.prompt_rows, hidden, self.lm_head, self.sampler.vocab_size)
            logits = self.lm_head(hidden[inputs.logits_indices]) if inputs.sampled_requests else None
            return LaunchedForward(inputs.sampled_requests, logits, prompt_logprobs, inputs.proposed)
        if not inputs.sampled_requests:
            self.forward(inputs.input_ids, inputs.positions, inputs.metadata, inputs.logits_indices)
            return LaunchedForward([], None)
        if graph is not None:
            logits = graph.run(inputs)
        else:
            logits = self.forward(inputs.input_ids, inputs.positions, inputs.metadata, inputs.logits_indices)
        return LaunchedForward(inputs.sampled_requests, logits, proposed=inputs.proposed)

    def graph_for(self, inputs: StepInputs):
        """The graph runner whose shape the step has, or None (eager). A captured graph runs the LM
        head on the sampled rows only; prompt logprobs need it on more."""
        if inputs.prompt_rows is not None:
            return None
        runner = self.graph_runner if inputs.proposed is None else self.spec_graph_runner
        return runner if runner is not None and runner.fits(inputs) else None

    @torch.inference_mode()
    def launch_sampling(self, forward: LaunchedForward) -> LaunchedStep:
        """Queue the sampling of a launched forward; never waits for the device.

        Called once the host knows every earlier token of the sampled sequences (the engine reads
        the previous step's tokens in between), so penalties, min_tokens and grammars see them all.
        """
        if forward.logits is None:
            return LaunchedStep([], prompt_logprobs=forward.prompt_logprobs)
        if forward.proposed is None:
            rows = [self.sampler_row(r) for r in forward.sampled_requests]
            self._last_sampled_rows = {request: row for row, request in enumerate(forward.sampled_requests)}
        else:
            rows = []
            self._last_sampled_rows = {}
            for request, proposed in zip(forward.sampled_requests, forward.proposed, strict=True):
                rows.extend(self.speculative_rows(request, proposed))
                self._last_sampled_rows[request] = len(rows) - 1
        output = self.sampler(forward.logits, rows)
        self._last_sampled = output.token_ids
        return LaunchedStep(forward.sampled_requests, output, forward.prompt_logprobs, forward.proposed)

    def speculative_rows(self, request: Request, proposed: list[int]) -> list[SamplingRow]:
        """The rows that sample the target's token at each verified position: position j sees the
        output followed by the first j proposals, as plain decoding would if they were accepted."""
        assert request.grammar is None or not proposed, "constrained sequences are not speculated"
        rows = [self.sampler_row(request)]
        for j in range(1, len(proposed) + 1):
            output = request.output_token_ids + proposed[:j]
            rows.append(SamplingRow(request.params, request.prompt_token_ids, output, request.seed))
        return rows


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# Every section of the packed step tensor starts at a multiple of 16 bytes from its start (which
# the allocators align far more): Triton specializes pointer arguments on 16-byte alignment, and a
# section whose offset followed the batch size would flip it from step to step (a new compile).
_SECTION_ALIGNMENT_INT32 = 4


def _section_spans(layout: StepLayout) -> list[tuple[int, int]]:
    """(offset, length) in int32 elements of each section of the packed step tensor: input ids,
    positions, slot mapping, logits indices, in-flight rows (int64, two int32 each), then query
    starts, sequence lengths, block tables (int32). Rank 0 and the TP workers both derive it from
    the layout, so only the layout's few ints travel besides the tensor."""
    num_tokens, num_seqs = layout.num_tokens, layout.num_seqs
    lengths = [
        *(2 * n for n in (num_tokens, num_tokens, num_tokens, layout.num_sampled, 2 * layout.num_inflight)),
        num_seqs + 1,
        num_seqs,
        num_seqs * layout.max_blocks,
    ]
    spans, offset = [], 0
    for length in lengths:
        spans.append((offset, length))
        offset += _round_up(length, _SECTION_ALIGNMENT_INT32)
    return spans


def _pack_aligned(sections: list[np.ndarray], spans: list[tuple[int, int]]) -> np.ndarray:
    """One int32 buffer holding the sections (int64 ones as int32 pairs) at their spans."""
    last_start, last_length = spans[-1]
    buffer = np.zeros(last_start + _round_up(last_length, _SECTION_ALIGNMENT_INT32), dtype=np.int32)
    for section, (start, length) in zip(sections, spans):
        buffer[start : start + length] = section.view(np.int32) if section.dtype == np.int64 else section
    return buffer


def _pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "triton" if device.type == "cuda" else "torch"


# Exercises every sampler stage so profiling sees its peak memory.
_PROFILE_PARAMS = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, logprobs=20)
