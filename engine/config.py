"""Engine settings: one dataclass, loadable from a YAML file in configs/, overridable by keyword."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.speculation.config import SpeculativeConfig


@dataclass
class EngineConfig:
    # Hub id, local directory, .gguf file, or a built-in name (engine/models/builtin_models.py);
    # None: SmolLM2-135M-Instruct.
    model: str | None = None
    gguf_file: str | None = None  # a .gguf file inside the directory `model`
    tokenizer: str | None = None  # defaults to the model
    served_model_name: str | None = None  # the name clients use; defaults to the model
    load_format: str = "auto"  # "auto": read the checkpoint; "dummy": random weights from the config
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit pool size; overrides the memory budget
    kv_cache_memory: int | None = None  # bytes for the KV cache on the CPU (default: 1 GiB)
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: never capture CUDA graphs
    # Schedule and launch step N+1 before reading step N's tokens, so host work overlaps the GPU.
    # None: on for CUDA, off for the CPU (where the forward runs on the host and nothing overlaps).
    async_scheduling: bool | None = None
    attention_backend: str = "auto"  # "auto" | "torch" | "triton"
    skip_tokenizer_init: bool = False  # token-id prompts only, no text (benchmarks of dummy models)
    # Shard the model over this many devices (ranks; rank 0 drives, engine/parallel/ has the rest).
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False  # let a hub model run its own Python (modeling, tokenizer)
    revision: str | None = None  # the model's hub branch, tag or commit (default: main)
    # Speculative decoding, vLLM's dict: {"method": "ngram", "num_speculative_tokens": 3,
    # "prompt_lookup_min": 1, "prompt_lookup_max": 4} or {"method": "draft_model", "model": PATH,
    # "num_speculative_tokens": 3}; a JSON string is read as that dict. None: off.
    speculative_config: dict[str, Any] | str | None = None

    def __post_init__(self) -> None:
        _check(
            self.block_size in (8, 16, 32, 64, 128),
            "block_size",
            f"must be 8, 16, 32, 64 or 128, got {self.block_size}",
        )
        _check(
            self.load_format in ("auto", "dummy"),
            "load_format",
            f"must be 'auto' or 'dummy', got {self.load_format!r}",
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "dtype",
            f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _check(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            f"must be >= 1, got {self.max_num_batched_tokens}",
        )
        _check(
            self.num_kv_blocks is None or self.num_kv_blocks >= 1,
            "num_kv_blocks",
            f"must be >= 1, got {self.num_kv_blocks}",
        )
        _check(
            self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            f"must be >= 1, got {self.tensor_parallel_size}",
        )
        _check(
            self.attention_backend in ("auto", "torch", "triton"),
            "attention_backend",
            f"must be auto, torch or triton, got {self.attention_backend!r}",
        )
        speculative = SpeculativeConfig.parse(self.speculative_config)
        if speculative is not None:
            self.speculative_config = dataclasses.asdict(speculative)  # plain data: JSON for TP workers
            _check(
                speculative.method != "draft_model" or self.tensor_parallel_size == 1,
                "speculative_config",
                "a draft model is not supported with tensor_parallel_size > 1 (use method 'ngram')",
            )

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """Settings from a YAML file, then keyword overrides (None values do not override)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown engine settings in {path}: {sorted(unknown)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ValueError(f"Invalid value for '{param}': {message}")
