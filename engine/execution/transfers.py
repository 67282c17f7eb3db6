"""Host <-> device copies that never make the host wait for the GPU's queued work."""

from __future__ import annotations

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. On CUDA it goes through pinned memory, so the copy is queued like a
    kernel; a copy from pageable memory would first wait for all queued work."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    """A queued device-to-host copy into pinned memory; valid once the work queued so far has run."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
