"""Puts the fused kernels inside a transformers model, for forwards run with the Triton backend.

- Llama-family RMSNorm modules get an instance `forward` that calls `rms_norm`.
- Gated SiLU MLPs (gate_proj, up_proj, down_proj without biases, act_fn = SiLU) get one that runs
  gate and up as one matmul, over a merged weight that their own weights become views of (no
  extra memory), then `silu_and_mul`.
- The modeling module's `apply_rotary_pos_emb` (looked up at call time by its attention classes)
  is wrapped so that it calls `apply_rotary`.

Each falls through to transformers' own code outside an engine forward with the Triton backend, so
the same model object still runs as plain transformers (the benchmarks' baselines use it). Each
replacement is checked against the code it replaces on random inputs first, on the model's device
and dtype; a module whose behaviour differs (another norm formula, partial rotary) keeps its own.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor

from engine.attention.metadata import current_forward_context
from engine.kernels.rms_norm import rms_norm
from engine.kernels.rotary import apply_rotary
from engine.kernels.silu_mul import silu_and_mul

logger = logging.getLogger(__name__)


def _fused_here() -> bool:
    context = current_forward_context()
    return context is not None and context.backend == "triton"


def install_fused_kernels(model: torch.nn.Module) -> list[str]:
    """Installs what checks out; returns a line per kind of replacement, for the log."""
    installed = []
    for kind, install in (("RMSNorm", _install_rms_norms), ("SiLU MLP", _install_mlps)):
        counts = install(model)
        if counts:
            installed.append(f"{kind} ({counts})")
    installed += [f"rotary ({name})" for name in _install_rotary(model)]
    logger.info("Fused kernels: %s", ", ".join(installed) or "none")
    return installed


# ---- RMSNorm ---------------------------------------------------------------------------------


def _fused_rms_norm_forward(module: torch.nn.Module, original: Callable, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _fused_here():
        return original(hidden_states)
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _looks_like_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.nn.Parameter)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _install_forwards(
    model: torch.nn.Module,
    looks_right: Callable[[torch.nn.Module], bool],
    matches: Callable[[torch.nn.Module], bool],
    fused_forward: Callable,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> str:
    """Gives each module that looks right, of a class whose first instance matches its own forward,
    an instance forward `fused_forward(module, original_forward, *args)` (after `prepare(module)`);
    returns counts per class."""
    verified: dict[type, bool] = {}
    counts: dict[str, int] = {}
    for module in model.modules():
        if "forward" in module.__dict__ or not looks_right(module):
            continue
        kind = type(module)
        if kind not in verified:
            verified[kind] = matches(module)
        if verified[kind]:
            if prepare is not None:
                prepare(module)
            module.forward = functools.partial(fused_forward, module, module.forward)
            counts[kind.__name__] = counts.get(kind.__name__, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in counts.items())


def _install_rms_norms(model: torch.nn.Module) -> str:
    return _install_forwards(model, _looks_like_rms_norm, _rms_norm_matches, _fused_rms_norm_forward)


def _rms_norm_matches(module: torch.nn.Module) -> bool:
    weight = module.weight
    x = 4 * torch.randn(3, 5, weight.shape[0], device=weight.device, dtype=weight.dtype)
    return _matches(type(module).__name__, lambda: [module(x)], lambda: [rms_norm(x, weight, module.variance_epsilon)])


# ---- gated SiLU MLP ---------------------------------------------------------------------------


def _fused_mlp_forward(module: torch.nn.Module, original: Callable, x: torch.Tensor) -> torch.Tensor:
    if not _fused_here():
        return original(x)
    return module.down_proj(silu_and_mul(torch.nn.functional.linear(x, module.sluice_gate_up_weight)))


def _looks_like_silu_mlp(module: torch.nn.Module) -> bool:
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    activation = type(getattr(module, "act_fn", None)).__name__
    return (
        all(isinstance(p, torch.nn.Linear) and p.bias is None for p in projections)
        and activation in ("SiLU", "SiLUActivation")
        and projections[0].weight.shape == projections[1].weight.shape
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor-parallel (DTensor) weight; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _merge_gate_up(module: torch.nn.Module) -> None:
    """One [2I, H] weight for both projections; gate_proj and up_proj keep working on views of it.

    Under tensor parallelism both are column shards ([I/N, H] on each rank): the merge is of this
    rank's shards, so the fused matmul yields this rank's gate and up columns, which is what the
    row-parallel down_proj (whose forward holds the all-reduce) expects."""
    gate, up = module.gate_proj.weight, module.up_proj.weight
    merged = torch.cat([_local(gate).detach(), _local(up).detach()])
    size = _local(gate).shape[0]
    module.gate_proj.weight = torch.nn.Parameter(_like(gate, merged[:size]), requires_grad=gate.requires_grad)
    module.up_proj.weight = torch.nn.Parameter(_like(up, merged[size:]), requires_grad=up.requires_grad)
    module.sluice_gate_up_weight = merged


def _like(original: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` as the weight `original` was: a DTensor of the same layout over it, or itself."""
    if not isinstance(original, DTensor):
        return local
    mesh, placements = original.device_mesh, original.placements
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=original.shape, stride=original.stride())


def _mlp_matches(module: torch.nn.Module) -> bool:
    weight = module.gate_proj.weight
    x = torch.randn(3, 5, weight.shape[1], device=weight.device, dtype=weight.dtype)
    merged = torch.cat([_local(module.gate_proj.weight), _local(module.up_proj.weight)])
    return _matches(
        type(module).__name__,
        lambda: [module(x)],
        lambda: [module.down_proj(silu_and_mul(torch.nn.functional.linear(x, merged)))],
    )


def _install_mlps(model: torch.nn.Module) -> str:
    return _install_forwards(model, _looks_like_silu_mlp, _mlp_matches, _fused_mlp_forward, prepare=_merge_gate_up)


# ---- rotary embedding ------------------------------------------------------------------------


def _install_rotary(model: torch.nn.Module) -> list[str]:
    """Wraps apply_rotary_pos_emb in the modeling modules of the model's attention classes."""
    names = []
    config = model.config.get_text_config()
    for module in model.modules():
        if not hasattr(module, "layer_idx") or not hasattr(module, "q_proj"):
            continue
        modeling = sys.modules[type(module).__module__]
        name = modeling.__name__.rsplit(".", 1)[-1]
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None or name in names:
            continue
        if getattr(original, "sluice_original", None) is not None:  # by an earlier engine in this process
            names.append(name)
            continue
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if not _rotary_matches(original, head_dim, module.q_proj.weight):
            continue
        modeling.apply_rotary_pos_emb = _guarded_rotary(original)
        names.append(name)
    return names


def _guarded_rotary(original: Callable) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs or not _fused_here():  # unsqueeze_dim other than the default: not ours
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rotary(q, k, cos, sin)

    apply_rotary_pos_emb.sluice_original = original
    return apply_rotary_pos_emb


def _rotary_matches(original: Callable, head_dim: int, like: torch.Tensor) -> bool:
    make = functools.partial(torch.randn, device=like.device, dtype=like.dtype)
    q, k = make(1, 4, 3, head_dim), make(1, 2, 3, head_dim)
    cos, sin = make(1, 3, head_dim), make(1, 3, head_dim)
    return _matches("rotary", lambda: original(q, k, cos, sin), lambda: apply_rotary(q, k, cos, sin))


def _matches(
    what: str, theirs: Callable[[], Sequence[torch.Tensor]], ours: Callable[[], Sequence[torch.Tensor]]
) -> bool:
    """Whether our kernels give what transformers' code gives on the same inputs. Any failure (another
    signature, a kernel that cannot run here) is a no, logged: it must not stop the engine."""
    with torch.no_grad():
        try:
            expected, got = theirs(), ours()
        except Exception:  # noqa: BLE001
            logger.warning("Fused %s failed its check; keeping transformers' own", what, exc_info=True)
            return False
    return len(got) == len(expected) and all(_close(g, e, what) for g, e in zip(got, expected))


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> bool:
    """Equal up to a unit or two in the last place of the dtype (reduction order, FMA, and Triton's
    CPU interpreter, which truncates when it rounds to bfloat16)."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        logger.warning(
            "Fused %s gives %s %s, transformers %s %s",
            what,
            got.dtype,
            tuple(got.shape),
            expected.dtype,
            tuple(expected.shape),
        )
        return False
    tolerance = 2 * torch.finfo(expected.dtype).eps
    # The absolute part scales with the values: a rounding step in a term that later cancels
    # (rotary's sum of products) is an ulp of the term, not of the result.
    scale = expected.float().abs().max().item()
    ok = torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance * max(scale, 1.0))
    if not ok:
        logger.warning("Fused %s differs from transformers' own; keeping theirs", what)
    return ok
