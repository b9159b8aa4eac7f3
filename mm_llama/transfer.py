"""Host -> device copies that do not wait for the GPU.

A plain `tensor.to("cuda")` from pageable memory returns only once the copy is done, and the copy is queued behind
every kernel already launched: while an image is being encoded, it would stall the host for the whole encoder
instead of letting it queue the prefill. A copy from pinned memory with `non_blocking=True` is queued and returns;
PyTorch's pinned-memory allocator keeps the buffer alive until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device`, without waiting for queued GPU work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def tensor_to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.tensor(data, dtype=dtype, device=device)` without waiting for queued GPU work."""
    return to_device(torch.tensor(data, dtype=dtype), device)
