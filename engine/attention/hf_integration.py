"""Plugs the engine's paged attention into transformers' attention interface."""

from __future__ import annotations

from types import ModuleType

import torch
from transformers import AttentionInterface

from engine.attention import reference
from engine.attention.metadata import get_forward_context

ATTN_IMPLEMENTATION = "sluice_paged"


def _backend(name: str) -> ModuleType:
    if name == "triton":
        from engine.attention import triton_attention

        return triton_attention
    return reference


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, T, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, T, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    context = get_forward_context()
    backend = _backend(context.backend)
    key_cache, value_cache = context.kv_caches[module.layer_idx]
    q = query[0].transpose(0, 1)  # [T, num_heads, head_dim]
    backend.store_kv(
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        key_cache,
        value_cache,
        context.metadata.slot_mapping,
    )
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = backend.paged_attention(q, key_cache, value_cache, context.metadata, scale)
    return out.unsqueeze(0), None  # transformers expects [1, T, num_heads, head_dim]


def register() -> None:
    """Make ATTN_IMPLEMENTATION a valid `attn_implementation` for every transformers model.

    No mask function is registered on purpose: for an implementation without one, transformers'
    mask creation returns None at once (5.17 and later). Registering even a function that returns
    None makes it first scan position_ids for packed sequences, a host sync on every forward that
    also breaks CUDA-graph capture. Paged attention takes causality from the metadata instead.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
