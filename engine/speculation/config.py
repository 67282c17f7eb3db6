"""speculative_config, in vLLM's shape: {"method": "ngram" | "draft_model", ...}."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram (prompt lookup): match the last n tokens, n from prompt_lookup_max down to prompt_lookup_min.
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # draft_model: a smaller model with the target's tokenizer (a hub id, directory or built-in name).
    model: str | None = None
    # No speculation in a step whose running batch holds more sequences than this: a large batch
    # is compute-bound, and verifying k extra tokens per row costs more than it saves. None: the
    # device's default (`batch_size_limit`).
    disable_by_batch_size: int | None = None

    def batch_size_limit(self, device_type: str) -> int:
        """disable_by_batch_size, or the default for the device. The CPU's 8 is measured (SmolLM2,
        benchmarks/RESULTS.md: n-gram k=3 wins 1.4-1.6x at 1-8 sequences, loses 13-17% at 64, and
        loses nothing at 64 with the limit at 8). A GPU's decode stays memory-bound at far larger
        batches; 32 there is a guess, for benchmarks/gpu_check.sh to settle."""
        if self.disable_by_batch_size is not None:
            return self.disable_by_batch_size
        return 32 if device_type == "cuda" else 8

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """The config from a dict (LLM(), YAML) or a JSON string (the command line); None: off.

        Raises ValueError naming the key and the rule it breaks."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"Invalid value for 'speculative_config': not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise ValueError(f"Invalid value for 'speculative_config': expected an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"Invalid value for 'speculative_config': unknown key(s) {unknown}; supported: {sorted(known)}"
            )
        method = value.get("method")
        if method is None:
            # vLLM infers the method from the other keys: a model means a draft model.
            method = "draft_model" if value.get("model") else "ngram"
        _require(method in METHODS, "method", f"must be one of {list(METHODS)}, got {method!r}")
        _require("num_speculative_tokens" in value, "num_speculative_tokens", "is required")
        for key in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size"):
            if key in value and value[key] is not None:
                _require(
                    isinstance(value[key], int) and not isinstance(value[key], bool),
                    key,
                    f"must be an integer, got {value[key]!r}",
                )
        config = cls(**{**value, "method": method})
        _require(
            1 <= config.num_speculative_tokens <= 16,
            "num_speculative_tokens",
            f"must be in [1, 16], got {config.num_speculative_tokens}",
        )
        _require(config.prompt_lookup_min >= 1, "prompt_lookup_min", f"must be >= 1, got {config.prompt_lookup_min}")
        _require(
            config.prompt_lookup_max >= config.prompt_lookup_min,
            "prompt_lookup_max",
            f"must be >= prompt_lookup_min ({config.prompt_lookup_min}), got {config.prompt_lookup_max}",
        )
        _require(
            config.disable_by_batch_size is None or config.disable_by_batch_size >= 1,
            "disable_by_batch_size",
            f"must be >= 1, got {config.disable_by_batch_size}",
        )
        if method == "draft_model":
            _require(isinstance(config.model, str) and bool(config.model), "model", "is required for a draft model")
        else:
            _require(config.model is None, "model", "applies to method 'draft_model' only")
        return config


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"Invalid value for 'speculative_config.{key}': {message}")
