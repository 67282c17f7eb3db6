"""One step's inputs, from rank 0 to every worker: a small header, then the step's packed tensor.

The tensor is the one rank 0's step preparation already built on its device (int32; see
`ModelRunner.prepare` and `unpack_step`), broadcast as it is: with NCCL the broadcast is queued on the
device behind the copy that filled them, so decode rows whose input token is still in flight (async
scheduling writes it on the device) need no host round trip, and rank 0's host never waits. Only
the header, a few integers the host already knows, crosses on the host (the gloo control group).

Invariant: every rank makes the same collectives in the same order. Rank 0 sends exactly one
message per forward it runs (and one STOP); a worker runs exactly one forward per message.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from engine.parallel.group import ParallelGroup

_STEP, _STOP = 1, 2
_MAX_FIELDS = 8  # the caller's header fields (the step's sizes and flags)
_HEADER_LEN = 2 + _MAX_FIELDS  # kind, numel of the tensor, fields


class StepSender:
    """Rank 0's side."""

    def __init__(self, group: ParallelGroup) -> None:
        self.group = group

    def send(self, fields: Sequence[int], packed: torch.Tensor) -> None:
        assert len(fields) <= _MAX_FIELDS and packed.dtype == torch.int32 and packed.is_contiguous()
        header = [_STEP, packed.numel(), *fields]
        header += [0] * (_HEADER_LEN - len(header))
        dist.broadcast(torch.tensor(header, dtype=torch.int64), 0, group=self.group.control)
        dist.broadcast(packed, 0)

    def stop(self) -> None:
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        header[0] = _STOP
        dist.broadcast(header, 0, group=self.group.control)


class StepReceiver:
    """A worker's side."""

    def __init__(self, group: ParallelGroup) -> None:
        self.group = group
        self._header = torch.zeros(_HEADER_LEN, dtype=torch.int64)

    def receive(self) -> tuple[list[int], torch.Tensor] | None:
        """The next step's (fields, packed tensor on this rank's device); None once rank 0 stops.
        Waits as long as the engine is idle; raises if rank 0 dies."""
        dist.broadcast(self._header, 0, group=self.group.control)
        header = self._header.tolist()
        if header[0] == _STOP:
            return None
        assert header[0] == _STEP, header
        packed = torch.empty(header[1], dtype=torch.int32, device=self.group.device)
        dist.broadcast(packed, 0)
        return header[2:], packed
