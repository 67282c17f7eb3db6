"""Sampling: request parameters (validated once at the edge), the batched sampler, grammar
constraints and prompt logprobs."""
