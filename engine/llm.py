"""The offline API, shaped like vLLM's LLM class."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling.sampling_params import OutputKind, SamplingParams

Message = dict[str, Any]


class LLM:
    """Generate for many prompts at once; the engine batches them continuously.

    LLM() with no model runs SmolLM2-135M-Instruct (converted from its PyPI package on first use);
    LLM("demo-random") the tiny random-weight demo model. See engine/models/builtin_models.py.
    """

    def __init__(self, model: str | None = None, config: EngineConfig | str | None = None, **overrides: Any) -> None:
        if isinstance(config, str):
            config = EngineConfig.from_yaml(config, model=model, **overrides)
        elif config is None:
            config = EngineConfig(model=model, **overrides)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the engine's tensor-parallel workers (interpreter exit does too); idempotent."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self) -> dict[str, int | list[int]]:
        return self.engine.stats()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"Invalid value for 'sampling_params': got {len(params_list)} for {len(prompts)} prompts"
                )
        request_ids = []
        # Validate everything before adding anything, so a bad prompt leaves the engine untouched.
        processed = []
        for prompt, params in zip(prompts, params_list):
            request_id = f"offline-{next(self._ids)}"
            final = dataclasses.replace(params, output_kind=OutputKind.FINAL_ONLY)
            processed.append(self.engine.process_request(request_id, prompt, final))
            request_ids.append(request_id)
        for user_request in processed:
            self.engine.add_processed(user_request)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in request_ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **chat_template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates."""
        tokenizer = self.engine.tokenizer
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            list(
                tokenizer.apply_chat_template(
                    conversation,
                    tools=tools,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=True,
                    return_dict=False,
                    **chat_template_kwargs,
                )
            )
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params)
