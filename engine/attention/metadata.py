"""Per-step attention metadata and the forward context that carries it into the model.

The model runner sets the context before each forward; the attention function registered with
transformers reads it. We do not pass metadata as forward kwargs because some transformers versions
drop keyword arguments they do not know.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes one packed batch of B sequences holding T query tokens in all.

    Sequence b owns query rows query_start_loc[b] : query_start_loc[b + 1]; its context after this
    step holds seq_lens[b] tokens, so its j-th query row sits at position
    seq_lens[b] - query_len_b + j and attends to every cached position up to and including that.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset; -1 writes nothing
    query_start_loc: torch.Tensor  # [B + 1] int32, on the device
    seq_lens: torch.Tensor  # [B] int32, on the device
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32; entries past a sequence's end unused
    max_query_len: int  # an upper bound on query lengths (host int: sizes kernel grids)
    max_seq_len: int  # an upper bound on seq_lens
    # Host copies for the torch reference, which loops over sequences; None in CUDA-graph replays.
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key_cache, value_cache)
    backend: str  # "torch" or "triton"


_current: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(context: ForwardContext) -> Iterator[None]:
    global _current
    previous, _current = _current, context
    try:
        yield
    finally:
        _current = previous


def current_forward_context() -> ForwardContext | None:
    """The context of the engine forward in progress, or None outside one."""
    return _current


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("paged attention called outside of the model runner's forward context")
    return _current
