"""No Triton kernel version is first compiled inside a timed benchmark run.

Triton compiles one version of a kernel per specialization of its arguments: dtypes and
constexprs, each integer on being 1 or a multiple of 16, each pointer on 16-byte alignment. A
version first needed inside the timed run compiles there (0.5 to a few seconds each, the GPU idle
meanwhile). These tests replay the qwen3-0.6b and llama-3.1-8b benchmarks (their workload, engine
settings and warm-up) through the real engine loop, scheduler and step preparation, with the
forward pass run by the model's own transformers layer with our kernels installed, on the meta
device: real shapes, strides and pointer offsets, no data and no compute. Every kernel launch is
recorded, not run, under the key Triton's own function gives it (`native_specialize_impl`, what
@triton.jit's argument binder calls, honouring each kernel's do_not_specialize).

One decoder layer stands for all: every layer launches the same kernels on the same arguments
(only the KV cache differs, allocated alike). Launches are recorded as if every step ran eagerly
(`--enforce-eager`, the sync fallback of gpu_check.sh); with CUDA graphs the decode steps replay
graphs captured at start, a subset.
"""

from __future__ import annotations

import inspect
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

pytest.importorskip("triton", reason="triton is not installed; its specialization cannot be checked")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

triton_native = pytest.importorskip("triton._C.libtriton", reason="needs Triton's native specialization (3.5+)")
if not hasattr(triton_native, "native_specialize_impl"):
    pytest.skip("this Triton specializes in Python, not with native_specialize_impl", allow_module_level=True)
from triton.backends.compiler import BaseBackend  # noqa: E402

from benchmarks import throughput  # noqa: E402
from benchmarks.workload import PRESETS, Preset, make_workload  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.attention import hf_integration, triton_attention  # noqa: E402
from engine.attention.metadata import ForwardContext, forward_context  # noqa: E402
from engine.kernels import install, rms_norm, rotary, sampling, silu_mul  # noqa: E402
from engine.sampling.sampler import SamplerOutput  # noqa: E402

pytestmark = pytest.mark.triton

KERNEL_MODULES = (triton_attention, rms_norm, rotary, silu_mul, sampling)
H200_SMS = 132  # the split-KV decision depends on the card's SM count
# The presets gpu_check.sh times (engine only for Llama-3.1-8B).
BENCHMARKED = ["qwen3-0.6b", "llama-3.1-8b"]
ENGINE_SETTINGS = dict(max_num_seqs=256, max_num_batched_tokens=8192)  # the defaults, as in configs/h100-*.yaml
# The engine's own model only has to accept the workload's prompt ids: the recorded forward
# below stands in for it.
STAND_IN_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 10_000,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": max(PRESETS[name].max_model_len for name in BENCHMARKED),
    "tie_word_embeddings": True,
}

Key = tuple[Any, ...]


class KernelSignature:
    """A kernel's parameters as its launches are keyed: constexpr or not, specialized or not."""

    def __init__(self, kernel: Any) -> None:
        self.name = kernel.fn.__name__
        self.parameters = inspect.signature(kernel.fn).parameters
        names = list(self.parameters)
        # A JITFunction keeps the list itself; the interpreter's stand-in keeps jit's keyword arguments.
        listed = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
        unspecialized = {names[item] if isinstance(item, int) else item for item in listed or []}
        # (name, default, constexpr?, specialized?)
        self.rows = [
            (name, p.default, "constexpr" in str(p.annotation), name not in unspecialized)
            for name, p in self.parameters.items()
        ]

    def key(self, args: tuple, kwargs: dict[str, Any]) -> Key:
        """What Triton would key the compiled version on: per argument, the constexpr value or Triton's
        own specialization (type, and "D" for divisible by 16 / 16-byte aligned, or the constant 1);
        then the launch options (num_warps, num_stages)."""
        bound = dict(zip(self.parameters, args)) | {k: v for k, v in kwargs.items() if k in self.parameters}
        key: list[Any] = [self.name]
        for name, default, constexpr, specialized in self.rows:
            value = bound.get(name, default)
            if constexpr:
                key.append((name, value))
            else:
                key.append((name, triton_native.native_specialize_impl(BaseBackend, value, False, specialized, True)))
        key.append(tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.parameters)))
        return tuple(key)


class Recorder:
    """Replaces every kernel launch by recording its specialization key; `phase` names where it ran."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.keys: dict[str, dict[Key, int]] = defaultdict(dict)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for module in KERNEL_MODULES:
            for value in vars(module).values():
                if hasattr(value, "fn") and hasattr(value, "run") and hasattr(value, "__getitem__"):
                    monkeypatch.setattr(value, "run", self._recording_run(value))

    def _recording_run(self, kernel: Any):
        signature = KernelSignature(kernel)

        def run(*args, grid, warmup, **kwargs):
            key = signature.key(args, kwargs)
            self.keys[self.phase][key] = self.keys[self.phase].get(key, 0) + 1

        return run


def _meta_model(monkeypatch: pytest.MonkeyPatch, preset: Preset) -> torch.nn.Module:
    """One bf16 decoder layer of the preset's model on the meta device, with our attention and fused kernels."""
    config = AutoConfig.for_model(**json.loads(Path(preset.config_file).read_text()))
    config.num_hidden_layers = 1
    hf_integration.register()
    config._attn_implementation = hf_integration.ATTN_IMPLEMENTATION
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # The install-time checks compare numbers, which the meta device does not have; on real devices
    # they pass for Qwen3 and Llama (tests/test_fused_kernels.py).
    monkeypatch.setattr(install, "_matches", lambda *args: True)
    installed = install.install_fused_kernels(model)
    assert len(installed) == 3, installed  # RMSNorm, the gated MLP and rotary all in place
    return model


@pytest.fixture(scope="module", params=BENCHMARKED)
def recorder(request, tmp_path_factory) -> Iterator[Recorder]:
    """Every kernel launch of a benchmark replay, by phase."""
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder.install(monkeypatch)
        monkeypatch.setattr(triton_attention, "_num_sms", lambda device: H200_SMS)
        preset = PRESETS[request.param]
        llm = _recording_engine(monkeypatch, tmp_path_factory.mktemp("stand-in"), preset)
        _replay_benchmark(llm, recorder, preset)
    yield recorder


def _recording_engine(monkeypatch: pytest.MonkeyPatch, model_dir: Path, preset: Preset) -> LLM:
    """The benchmark's engine settings with its forward pass and sampling recorded, not run."""
    model = _meta_model(monkeypatch, preset)
    text_config = model.config
    cache_shape = (4096, 16, text_config.num_key_value_heads, text_config.head_dim)
    kv_caches = [(torch.empty(cache_shape, dtype=torch.bfloat16, device="meta"),) * 2]
    (model_dir / "config.json").write_text(json.dumps(STAND_IN_CONFIG))
    llm = LLM(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        device="cpu",
        attention_backend="torch",
        async_scheduling=True,  # as on the GPU
        enforce_eager=True,
        max_model_len=preset.max_model_len,
        num_kv_blocks=40_000,  # no preemption, as on an H200 (about a million tokens of KV)
        **ENGINE_SETTINGS,
    )
    runner = llm.engine.runner
    temperatures = torch.empty(ENGINE_SETTINGS["max_num_seqs"], device="meta")
    seeds = torch.empty(ENGINE_SETTINGS["max_num_seqs"], dtype=torch.int64, device="meta")

    def recorded_forward(input_ids, positions, metadata, logits_indices):
        context = ForwardContext(metadata=metadata, kv_caches=kv_caches, backend="triton")
        with forward_context(context):
            hidden = model.base_model(
                input_ids=input_ids.to("meta")[None], position_ids=positions.to("meta")[None], use_cache=False
            ).last_hidden_state[0]
            logits = model.lm_head(hidden[logits_indices.to("meta")])
        rows = logits.shape[0]
        # The fused sampler's kernel, as the sampler calls it for the workload's plain temperature rows.
        sampling.gumbel_argmax(logits, temperatures[:rows], seeds[:rows], text_config.vocab_size)
        return torch.empty(rows, 0)

    def sampled_zeros(logits, rows):
        return SamplerOutput(torch.zeros(len(rows), dtype=torch.int64), None, [None] * len(rows))

    monkeypatch.setattr(runner, "forward", recorded_forward)
    monkeypatch.setattr(runner, "sampler", sampled_zeros)
    return llm


def _replay_benchmark(llm: LLM, recorder: Recorder, preset: Preset) -> None:
    """What benchmarks.throughput does on the GPU: warm up, the timed run, the batch-1 decode."""
    recorder.phase = "warm-up"
    throughput.warm_up(llm, temperature=0.6)
    prompts, output_lens = make_workload(
        preset.num_seqs,
        preset.min_input,
        preset.max_input,
        preset.min_output,
        preset.max_output,
        STAND_IN_CONFIG["vocab_size"],
    )
    recorder.phase = "timed run"
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in output_lens]
    outputs = llm.generate(prompts, params)
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == sum(output_lens)
    assert llm.stats()["num_preemptions"] == 0
    recorder.phase = "decode at batch 1"
    throughput.measure_decode_batch1(llm, temperature=0.6)


def _describe(keys: list[Key]) -> str:
    return "\n".join(str(key) for key in keys)


def test_the_warm_up_compiles_every_kernel_version_the_timed_run_needs(recorder):
    warm = set(recorder.keys["warm-up"])
    for phase, least in (("timed run", 1000), ("decode at batch 1", 256)):  # at least a launch a step
        launches = recorder.keys[phase]
        assert sum(launches.values()) >= least  # the replay really ran
        missing = [key for key in launches if key not in warm]
        assert not missing, f"{len(missing)} kernel versions first compiled in the {phase}:\n{_describe(missing)}"


def test_arguments_that_vary_by_step_do_not_change_a_kernels_specialization(recorder):
    """Per kernel and tile shape (constexprs and launch options), one specialization of the rest:
    block-table widths, packed-buffer offsets, row, token and split counts never change it."""
    versions: dict[Key, set[Key]] = defaultdict(set)
    for launches in recorder.keys.values():
        for name, *arguments, options in launches:
            # (name, value) for constexprs; (name, (type, specialization)) for the rest.
            shape = (name, options, *(a for a in arguments if not isinstance(a[1], tuple)))
            versions[shape].add(tuple(a for a in arguments if isinstance(a[1], tuple)))
    details = []
    for shape, specializations in versions.items():
        if len(specializations) > 1:
            seen = defaultdict(set)
            for specialization in specializations:
                for argument, value in specialization:
                    seen[argument].add(value)
            changing = {argument: values for argument, values in seen.items() if len(values) > 1}
            details.append(f"{shape[0]} {shape[2:]}: {changing}")
    assert not details, "\n".join(details)

    # The packed step buffers' sections reach the kernels 16-byte aligned, and the block table's row
    # stride is a multiple of 16, in every step.
    attention = [key for launches in recorder.keys.values() for key in launches if key[0] == "_paged_attention_kernel"]
    store = [key for launches in recorder.keys.values() for key in launches if key[0] == "_store_kv_kernel"]
    assert attention and store
    for key in attention:
        arguments = dict(key[1:-1])
        for name in ("block_tables_ptr", "query_start_loc_ptr", "seq_lens_ptr"):
            assert arguments[name] == ("*i32", "D"), (name, arguments[name])
        assert arguments["stride_bt"] == ("i32", "D")
    for key in store:
        assert dict(key[1:-1])["slot_mapping_ptr"] == ("*i64", "D")
