"""Draft-model proposals: a smaller model with the target's tokenizer proposes k tokens greedily.

The draft has its own paged KV cache with the same block count and block size as the target's, and
reads and writes it at the sequence's own block ids: the scheduler's block bookkeeping (allocation,
prefix caching, preemption, freeing) serves both caches, and no second allocator exists.
`Request.num_draft_computed_tokens` says how far the draft's K/V of a sequence is valid.

Proposing for a sequence whose p + 1 tokens are known (the last, p, not yet computed by the target):
  1. catch up: the draft computes its K/V for the positions [num_draft_computed, p], chunked to the
     token budget, the rows of many sequences in one pass; the last position's logits give d1;
  2. k - 1 decode passes, all proposing rows at once, each feeding the previous pass's argmax at
     the next position (its K/V goes to positions p + 1 .. p + k - 1).
Blocks for those positions and the target's verification (up to p + k) are allocated first; a
sequence that cannot get them is not speculated this step. The K/V written at proposal positions
is never trusted afterwards: num_draft_computed_tokens stops at p + 1, and the next catch-up
recomputes the accepted tokens (a few tokens per row, cheap for a small model). So whatever
happens to the proposals (verified, cut by the budget, dropped), positions below
num_draft_computed_tokens hold the draft's K/V of the sequence's real tokens.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata
from engine.config import EngineConfig
from engine.execution.loader import LoadedModel, load
from engine.execution.model_runner import ModelRunner
from engine.execution.transfers import host_to_device
from engine.scheduling.kv_cache import KVCacheManager
from engine.scheduling.request import Request
from engine.speculation.config import SpeculativeConfig

logger = logging.getLogger(__name__)


def load_draft_runner(config: EngineConfig, speculative: SpeculativeConfig) -> ModelRunner:
    """The draft model with a one-block KV cache: the target sizes the shared pool knowing the
    draft's bytes per block, then `DraftModelProposer` resizes this cache to the pool's count."""
    draft_config = dataclasses.replace(
        config,
        model=speculative.model,
        gguf_file=None,
        tokenizer=None,
        served_model_name=None,
        max_model_len=None,  # the draft's own limit; positions past it are not speculated
        skip_tokenizer_init=True,
        speculative_config=None,
        num_kv_blocks=1,
        enforce_eager=True,  # the draft's passes are small; graphs for them are future work
    )
    loaded: LoadedModel = load(draft_config)
    logger.info("Draft model %s loaded for speculative decoding", loaded.model_path)
    return ModelRunner(loaded, draft_config)


class DraftModelProposer:
    def __init__(
        self,
        speculative: SpeculativeConfig,
        config: EngineConfig,
        draft: ModelRunner,
        target: ModelRunner,
        kv_cache: KVCacheManager,
    ) -> None:
        if draft.block_size != target.block_size:
            raise ValueError("Invalid value for 'speculative_config.model': the draft must use the target's block_size")
        # The draft reads the target's token ids: its embedding must cover every one of them.
        draft_vocab = draft.model.config.get_text_config().vocab_size
        target_vocab = target.model.config.get_text_config().vocab_size
        if draft_vocab < target.sampler.vocab_size:
            raise ValueError(
                f"Invalid value for 'speculative_config.model': the draft's vocabulary ({draft_vocab} tokens) "
                f"is smaller than the target's ({target_vocab}); a draft model must use the target's tokenizer"
            )
        self.draft = draft
        self.kv_cache = kv_cache
        draft.resize_kv_cache(target.num_kv_blocks)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        # Proposals are target input ids: never past the target's vocabulary.
        self.vocab_size = target.sampler.vocab_size
        self.max_model_len = min(draft.max_model_len, target.max_model_len)
        self.device = draft.device
        self.block_size = draft.block_size

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        proposals: list[list[int]] = [[] for _ in requests]
        rows = []  # (index in requests, k) of the sequences that get proposals
        for index, (request, k) in enumerate(zip(requests, num_tokens, strict=True)):
            k = min(k, self.max_model_len - request.num_tokens)
            # Blocks up to position p + k: the draft writes up to p + k - 1, the target verifies p + k.
            if k > 0 and self.kv_cache.allocate(request, 1 + k):
                rows.append((index, k))
        if not rows:
            return proposals
        first_tokens = self._catch_up([requests[i] for i, _ in rows])
        max_k = max(k for _, k in rows)
        drafts = [first_tokens]
        for j in range(1, max_k):  # position p + j gets d_j as input, and gives d_(j+1)
            drafts.append(self._decode_pass([(requests[i], k) for i, k in rows], drafts[-1], j))
        proposed = torch.stack(drafts, dim=1).tolist()  # one device-to-host copy for all passes
        for (index, k), tokens in zip(rows, proposed, strict=True):
            request = requests[index]
            proposals[index] = tokens[:k]
            request.num_draft_computed_tokens = request.num_tokens
        return proposals

    def _catch_up(self, requests: list[Request]) -> torch.Tensor:
        """Computes each sequence's draft K/V from num_draft_computed_tokens through its last token,
        in passes of at most the token budget; returns the argmax after each last token [R]."""
        firsts = torch.empty(len(requests), dtype=torch.long, device=self.device)
        starts = [min(r.num_draft_computed_tokens, r.num_tokens - 1) for r in requests]
        while True:
            chunks, budget = [], self.max_num_batched_tokens
            for row, (request, start) in enumerate(zip(requests, starts)):
                remaining = request.num_tokens - start
                if remaining > 0 and budget > 0:
                    take = min(remaining, budget)
                    chunks.append((row, request, start, start + take))
                    budget -= take
            if not chunks:
                return firsts
            rows = [(r.block_ids, start, r.token_ids_in(start, end)) for _, r, start, end in chunks]
            last_rows = [i for i, (_, r, _, end) in enumerate(chunks) if end == r.num_tokens]
            logits = self._forward(rows, last_rows)
            if last_rows:
                index = torch.tensor([chunks[i][0] for i in last_rows], device=self.device)
                firsts.index_copy_(0, index, logits[:, : self.vocab_size].argmax(dim=-1))
            for row, _, _, end in chunks:
                starts[row] = end

    def _decode_pass(self, rows: list[tuple[Request, int]], input_ids: torch.Tensor, j: int) -> torch.Tensor:
        """One token per proposing row at position p + j (its K/V written only where j < k)."""
        packed = [(r.block_ids, r.num_tokens - 1 + j, None) for r, _ in rows]
        writes = [j < k for _, k in rows]
        return self._forward(packed, list(range(len(rows))), input_ids, writes)[:, : self.vocab_size].argmax(dim=-1)

    def _forward(
        self,
        rows: list[tuple[list[int], int, list[int] | None]],
        sample_rows: list[int],
        device_input_ids: torch.Tensor | None = None,
        writes: list[bool] | None = None,
    ) -> torch.Tensor:
        """A draft forward over rows of (block ids, first position, token ids); logits of the last
        position of each row in sample_rows. With device_input_ids, every row is one token whose id
        is on the device already; rows whose `writes` is False write no K/V (their positions may lie
        past the blocks the sequence holds; their outputs are discarded)."""
        block_size = self.block_size
        lengths = [1 if tokens is None else len(tokens) for _, _, tokens in rows]
        query_start = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=query_start[1:])
        seq_lens = [start + length for (_, start, _), length in zip(rows, lengths)]
        # Wide enough for every position a row reads (a discarded row may read past its blocks: zeros).
        width = max(
            max(len(block_ids), -(-seq_len // block_size)) for (block_ids, _, _), seq_len in zip(rows, seq_lens)
        )
        block_tables = np.zeros((len(rows), -(-width // 16) * 16), dtype=np.int32)
        positions, slots = [], []
        for row, (block_ids, start, _) in enumerate(rows):
            block_tables[row, : len(block_ids)] = block_ids
            for position in range(start, start + lengths[row]):
                positions.append(position)
                block = position // block_size
                writable = (writes is None or writes[row]) and block < len(block_ids)
                slots.append(block_ids[block] * block_size + position % block_size if writable else -1)
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=host_to_device(torch.tensor(slots, dtype=torch.int64), device),
            query_start_loc=host_to_device(torch.from_numpy(query_start.astype(np.int32)), device),
            seq_lens=host_to_device(torch.tensor(seq_lens, dtype=torch.int32), device),
            block_tables=host_to_device(torch.from_numpy(block_tables), device),
            max_query_len=max(lengths),
            max_seq_len=max(seq_lens),
            query_start_loc_host=query_start.tolist(),
            seq_lens_host=seq_lens,
        )
        if device_input_ids is None:
            input_ids = host_to_device(torch.tensor([t for _, _, tokens in rows for t in tokens]), device)
        else:
            input_ids = device_input_ids
        logits_indices = host_to_device(torch.tensor(query_start[1:][sample_rows] - 1, dtype=torch.int64), device)
        positions_d = host_to_device(torch.tensor(positions, dtype=torch.int64), device)
        return self.draft.forward(input_ids, positions_d, metadata, logits_indices)
