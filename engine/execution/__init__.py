"""Model execution: loading the transformers model, packing a step into tensors and running it
(eagerly or as a CUDA graph), and the host/device copies. The paged attention (`engine.attention`),
the fused kernels (`engine.kernels`) and the tensor-parallel workers (`engine.parallel`) sit beside
it."""
