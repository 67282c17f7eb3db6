"""Plugs the engine's paged attention into transformers' attention interface."""

from __future__ import annotations

from types import ModuleType

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

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


def _no_mask(*args, **kwargs) -> None:
    # Paged attention derives causality from the metadata; a dense mask would only cost memory.
    return None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
