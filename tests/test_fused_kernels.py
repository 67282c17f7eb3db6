"""The fused RMSNorm and rotary kernels agree with the transformers code they replace, and the
engine uses them only inside its own Triton-backend forwards.

On the CPU the kernels run in Triton's interpreter, which truncates when it rounds to bfloat16
(the GPU rounds to nearest, as torch does): bfloat16 results may differ there by one unit in the
last place, and are compared with that tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

pytest.importorskip("triton", reason="triton is not installed; the Triton kernels cannot be checked")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

from engine.kernels import install, rms_norm, rotary, silu_mul  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# An explicit pool: on a GPU the engine would otherwise profile and take 90% of the card.
SMALL_TRITON_ENGINE = dict(device=DEVICE, attention_backend="triton", num_kv_blocks=128, max_num_seqs=8)


def _assert_within_ulps(got: torch.Tensor, expected: torch.Tensor, ulps: float) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # One unit in the last place of each expected value (at least that of the dtype's smallest normal).
    exponent = torch.frexp(expected.float().abs().clamp(min=torch.finfo(expected.dtype).tiny)).exponent
    # x = m * 2**e with m in [0.5, 1): its ulp is eps * 2**(e - 1).
    ulp = torch.finfo(expected.dtype).eps * torch.exp2(exponent.float() - 1)
    error = (got.float() - expected.float()).abs()
    assert (error <= ulps * ulp).all(), f"max error {error.max().item()} over {ulps} ulp"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7, 64), (1, 9, 4, 32), (1, 3, 1000), (130, 128)])
def test_rms_norm_matches_transformers(dtype, shape):
    torch.manual_seed(0)
    norm = modeling_qwen3.Qwen3RMSNorm(shape[-1], eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
        x = 3 * torch.randn(shape, device=DEVICE, dtype=dtype)
        expected = norm(x)
    got = rms_norm.rms_norm(x, norm.weight, norm.variance_epsilon)
    # The sum of squares adds in another order; in the interpreter, two truncations (each up to an ulp
    # of its own value, which the weight scales) stand in for the GPU's rounding.
    _assert_within_ulps(got, expected, ulps=4)


def test_rms_norm_reads_strided_rows():
    norm = modeling_llama.LlamaRMSNorm(32).to(DEVICE)
    x = torch.randn(1, 6, 64, device=DEVICE)[..., ::2]  # every other column: a non-unit stride
    with torch.no_grad():
        _assert_within_ulps(rms_norm.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x), ulps=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (8, 8, 128), (6, 1, 32)])
def test_rotary_matches_transformers(dtype, num_heads, num_kv_heads, head_dim):
    torch.manual_seed(1)
    num_tokens = 11
    # As in the attention modules: heads split out of a projection, then transposed (not contiguous).
    q = torch.randn(1, num_tokens, num_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, num_tokens, num_kv_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    rope = modeling_llama.LlamaRotaryEmbedding(
        modeling_llama.LlamaConfig(head_dim=head_dim, num_attention_heads=num_heads, hidden_size=num_heads * head_dim)
    ).to(DEVICE)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 40, 41, 7, 1000, 3]], device=DEVICE)
    cos, sin = rope(q, positions)
    # Outside an engine forward this is transformers' own function, even once the engine wrapped it.
    expected_q, expected_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rotary.apply_rotary(q, k, cos, sin)
    assert got_q.stride() == expected_q.stride()  # the attention reads the same layout
    # Three roundings to the dtype per element; a truncated one can move the sum by an ulp of a term.
    ulps = 0 if dtype != torch.bfloat16 or DEVICE == "cuda" else 4
    for got, expected in ((got_q, expected_q), (got_k, expected_k)):
        if ulps == 0:
            assert torch.equal(got, expected)
        else:
            assert (got.float() - expected.float()).abs().max() <= ulps * 2**-7 * expected.float().abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_gated_mlp(dtype):
    torch.manual_seed(4)
    config = modeling_llama.LlamaConfig(
        hidden_size=48, num_attention_heads=4, intermediate_size=1300, hidden_act="silu"
    )
    mlp = modeling_llama.LlamaMLP(config).to(DEVICE, dtype)
    x = torch.randn(2, 7, 48, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        expected = mlp.act_fn(gate) * up
    got = silu_mul.silu_and_mul(torch.cat([gate, up], dim=-1))
    # exp may differ in its last fp32 bit; in the interpreter, two truncations replace rounding.
    _assert_within_ulps(got, expected, ulps=4)


def _spy(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_the_engine_uses_them_and_plain_transformers_does_not(model_dir_factory, monkeypatch):
    from engine import LLM, SamplingParams

    norm_calls = _spy(monkeypatch, install, "rms_norm")
    rotary_calls = _spy(monkeypatch, install, "apply_rotary")
    mlp_calls = _spy(monkeypatch, install, "silu_and_mul")
    model_dir = model_dir_factory("qwen3")
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, **SMALL_TRITON_ENGINE)
    model = llm.engine.runner.model
    config = model.config
    num_norms = 2 * config.num_hidden_layers + 1 + 2 * config.num_hidden_layers  # layers, final, q/k norms
    assert sum("forward" in m.__dict__ for m in model.modules()) == num_norms + config.num_hidden_layers  # + MLPs
    assert modeling_qwen3.apply_rotary_pos_emb.sluice_original is not None
    mlp = model.model.layers[0].mlp  # gate and up weights became views of one merged weight
    storage = mlp.sluice_gate_up_weight.untyped_storage().data_ptr()
    assert (
        mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr() == storage
    )

    norm_calls[0] = rotary_calls[0] = mlp_calls[0] = 0  # the install-time checks called them too
    llm.generate([[11, 12, 13]], SamplingParams(temperature=0.0, max_tokens=3))
    assert norm_calls[0] >= 3 * num_norms
    assert rotary_calls[0] >= 3 * config.num_hidden_layers and mlp_calls[0] >= 3 * config.num_hidden_layers

    # The same model object outside the engine is plain transformers: same logits as a fresh load.
    norm_calls[0] = rotary_calls[0] = mlp_calls[0] = 0
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    model.set_attn_implementation("sdpa")  # as the benchmarks' transformers baselines do
    fresh.set_attn_implementation("sdpa")
    ids = torch.tensor([[5, 6, 7, 8]], device=DEVICE)
    with torch.no_grad():
        ours, theirs = model(ids).logits, fresh(ids).logits
    assert norm_calls[0] == rotary_calls[0] == mlp_calls[0] == 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


class _OffsetRMSNorm(modeling_llama.LlamaRMSNorm):
    """Shaped like a Llama RMSNorm but scaling by (1 + weight), as Gemma's does."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) + modeling_llama.LlamaRMSNorm.forward(self, hidden_states) / self.weight


def test_a_norm_with_another_formula_keeps_its_own_forward(model_dir_factory):
    model = AutoModelForCausalLM.from_pretrained(model_dir_factory("llama"), dtype=torch.float32).to(DEVICE)
    norm = model.model.norm
    norm.__class__ = _OffsetRMSNorm
    install.install_fused_kernels(model)
    assert "forward" not in norm.__dict__
    assert all("forward" in layer.input_layernorm.__dict__ for layer in model.model.layers)
