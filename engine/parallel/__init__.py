"""Tensor parallelism: rank 0 drives the engine, ranks 1..N-1 replay its forward passes.

- `group`: the torch.distributed process groups of one tensor-parallel engine, and their lifetime.
- `launch`: starts the workers (spawned on this machine, or joined under torchrun) and watches them.
- `transport`: one step's inputs from rank 0 to the workers (a small header, then two tensors).
- `worker`: a worker rank's main loop (`python -m engine.parallel.worker`).

The model itself is sharded by transformers (`DistributedConfig(tp_size=N)`), never by us.
"""
