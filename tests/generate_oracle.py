"""The parity tests' oracle: transformers' own greedy `generate` in float32."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def greedy_generate(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy output ids, one prompt at a time (no padding), stopping at the model's EOS."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    results = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=eos,
            )
        results.append(out[0, len(prompt) :].tolist())
    return results
