"""The parts of vLLM's command line that need more than argparse: value formats and the flags we lack."""

from __future__ import annotations

import argparse
import codecs
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.speculation.config import SpeculativeConfig

# vLLM's --dtype spellings for the dtypes EngineConfig names.
DTYPE_ALIASES = {"half": "float16", "float": "float32"}

# vLLM flags sluicegate does not implement. A command line copied from vLLM that carries one fails
# with a message naming it, instead of argparse's bare "unrecognized arguments" or a silent no-op.
UNSUPPORTED_VLLM_FLAGS = frozenset(
    {
        "--quantization", "-q", "--kv-cache-dtype", "--calculate-kv-scales",
        "--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp", "--data-parallel-size-local",
        "--enable-expert-parallel", "--distributed-executor-backend", "--worker-cls",
        "--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank", "--max-cpu-loras",
        "--num-speculative-tokens", "--speculative-model",
        "--cpu-offload-gb", "--swap-space", "--kv-offloading-size", "--kv-transfer-config",
        "--tokenizer-mode", "--tokenizer-revision", "--code-revision", "--hf-overrides", "--hf-token",
        "--download-dir", "--rope-scaling", "--rope-theta", "--override-generation-config",
        "--task", "--runner", "--convert", "--limit-mm-per-prompt", "--mm-processor-kwargs",
        "--structured-outputs-config", "--guided-decoding-backend", "--compilation-config", "-O",
        "--max-seq-len-to-capture", "--cuda-graph-sizes", "--scheduling-policy", "--max-num-partial-prefills",
        "--no-enable-chunked-prefill", "--enable-sleep-mode", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs",
        "--middleware", "--response-role", "--chat-template-content-format", "--return-tokens-as-token-ids",
        "--disable-fastapi-docs", "--disable-uvicorn-access-log", "--tool-parser-plugin", "--lora-extra-vocab-size",
        "--uds", "--api-server-count", "--headless", "--load-format-sharded", "--enable-eplb",
    }
)  # fmt: skip
# vLLM flags for behaviour sluicegate always has: accepted, and they change nothing. (sluicegate logs no
# periodic stats, so --disable-log-stats is what it does anyway.)
ALWAYS_ON_VLLM_FLAGS = frozenset({"--enable-chunked-prefill", "--enable-prompt-tokens-details", "--disable-log-stats"})
# Older vLLM flags whose setting now lives in a newer flag's value (vLLM folded them the same way).
REPLACED_VLLM_FLAGS = {
    "--num-speculative-tokens": '--speculative-config \'{"method": "ngram", "num_speculative_tokens": N}\'',
    "--speculative-model": '--speculative-config \'{"model": DIR, "num_speculative_tokens": N}\'',
}


def check_unknown_flags(unknown: Sequence[str]) -> str | None:
    """The error for arguments argparse did not recognise (None when all are always-on vLLM flags)."""
    for argument in unknown:
        flag = argument.split("=", 1)[0]
        if flag in ALWAYS_ON_VLLM_FLAGS:
            continue
        if flag in REPLACED_VLLM_FLAGS:
            return f"{flag} is an older vLLM flag; use {REPLACED_VLLM_FLAGS[flag]}"
        if flag in UNSUPPORTED_VLLM_FLAGS:
            return f"{flag} is a vLLM flag that sluicegate does not support; remove it from the command line"
        if flag.startswith("-"):
            return f"{flag} is not a sluicegate flag (and not a vLLM flag it supports); see `sluice serve --help`"
        return f"unexpected argument {argument!r}: only one model may be given"
    return None


def human_readable_int(value: str) -> int:
    """vLLM's integer spellings: 4096, 4k (4,000), 25.6k (25,600), 4K (4,096), 1m (10**6), 1M (2**20)."""
    text = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG])", text)
    if match is None:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer such as 4096, 4k or 4K, got {value!r}") from None
    number, suffix = match.groups()
    decimal = {"k": 10**3, "m": 10**6, "g": 10**9}
    if suffix in decimal:
        return int(float(number) * decimal[suffix])
    if "." in number:
        raise argparse.ArgumentTypeError(
            f"decimals are not allowed with binary suffixes like {suffix}; did you mean {number}{suffix.lower()}?"
        )
    return int(number) * {"K": 2**10, "M": 2**20, "G": 2**30}[suffix]


def speculative_config(value: str) -> dict[str, Any]:
    """--speculative-config: vLLM's JSON object, checked here so that a mistake fails before any
    model loads, with the key it concerns (EngineConfig checks it again, as from YAML or LLM())."""
    try:
        parsed = json.loads(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({error})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    try:
        SpeculativeConfig.parse(parsed)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return parsed


def read_chat_template(value: str) -> str:
    """--chat-template: a file's contents, or (as vLLM reads it) the template itself when it is Jinja.

    Raises OSError when the value looks like a path (no braces, no newline) but cannot be read.
    """
    try:
        return Path(value).read_text()
    except (OSError, ValueError) as error:  # ValueError: a NUL byte, which no path holds
        if not any(c in value for c in "{}\n"):
            raise OSError(f"--chat-template {value!r} looks like a file path, but it cannot be read: {error}") from None
    # Inline: escapes such as \n in a shell argument mean what they say, as in vLLM.
    return codecs.decode(value, "unicode_escape")


# The generation_config.json fields vLLM takes as a request's defaults, and the request field each sets.
GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(value: str | None, model_path: str, revision: str | None = None) -> dict[str, Any]:
    """--generation-config: request defaults from a generation_config.json, as vLLM reads them.

    "auto": the model's own; a directory: that one's; None or "vllm": none (OpenAI's defaults). Only
    fields the file sets (differing from transformers' defaults) count. Raises OSError for a directory
    without one.
    """
    if value is None or value == "vllm":
        return {}
    from transformers import GenerationConfig

    source, kwargs = (model_path, {"revision": revision}) if value == "auto" else (value, {})
    try:
        config = GenerationConfig.from_pretrained(source, **kwargs)
    except OSError:
        if value == "auto":
            return {}  # a model without one: nothing to take
        raise OSError(f"--generation-config {value!r}: no generation_config.json there") from None
    found = config.to_diff_dict()
    return {ours: found[theirs] for theirs, ours in GENERATION_CONFIG_FIELDS.items() if found.get(theirs) is not None}
