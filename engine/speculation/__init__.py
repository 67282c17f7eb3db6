"""Speculative decoding: cheap proposals for the next tokens, verified by the target model in one
forward pass so that no answer changes (engine/speculation/speculator.py says how)."""
