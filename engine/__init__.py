"""sluicegate's engine: continuous batching over a paged KV cache, running transformers models.

Imports are lazy so that `import engine` stays cheap and never needs the HTTP stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling.sampling_params import OutputKind, SamplingParams

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine

__all__ = [
    "LLM",
    "AsyncLLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "OutputKind",
    "RequestOutput",
    "CompletionOutput",
    "TokenLogprob",
]


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from engine.async_llm import AsyncLLM

        return AsyncLLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
