"""The torch.distributed process groups of one tensor-parallel engine.

Two groups, because their waits differ:
- the default group (NCCL on CUDA, gloo on the CPU) carries the step tensors and the all-reduces
  transformers puts inside the sharded model's forward. Its timeout bounds every wait on a peer
  (`SLUICE_TP_TIMEOUT_S`, default 300 s: a NCCL peer that died leaves a collective waiting until
  then; gloo notices a closed connection at once).
- the control group (always gloo, on the host) carries each step's header. A worker waits on it
  whenever the engine is idle, for as long as the server has no request, so it has no practical
  timeout; rank 0's death closes its connections and ends the wait with an error.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("SLUICE_TP_TIMEOUT_S", "300")))
_IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class ParallelGroup:
    """This process's place in a tensor-parallel engine of `world_size` ranks."""

    rank: int
    world_size: int
    device: torch.device  # cuda:LOCAL_RANK, or the CPU
    control: dist.ProcessGroup

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (a collective: every rank calls it at the same point)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)  # the default group: a bounded wait
        return int(tensor.item())

    def destroy(self) -> None:
        """Leaves both groups; a later engine in this process starts new ones."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_group(
    rank: int,
    world_size: int,
    local_rank: int,
    device_type: str,
    store: dist.Store | None = None,
) -> ParallelGroup:
    """Joins the engine's groups: through `store` (spawned workers), or through the torchrun-style
    environment (MASTER_ADDR, MASTER_PORT) when `store` is None."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    # Started here rather than by transformers, which would give every wait a two-hour timeout.
    dist.init_process_group(
        backend,
        init_method=None if store is not None else "env://",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if backend == "nccl" else None,
    )
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    return ParallelGroup(rank=rank, world_size=world_size, device=device, control=control)
