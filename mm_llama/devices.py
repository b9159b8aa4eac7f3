"""The one place a device name a user typed becomes a `torch.device` (`--device`, `train.device`, `device=` in the
API), a dtype name a `torch.dtype` (`--dtype`), and where a loader's `dtype=` is checked.

`torch.device("tpu")` raises a bare RuntimeError listing PyTorch's internal device types, and `torch.device("cuda:7")`
on a one-GPU machine only fails at the first kernel; both should be an `InputError` naming the value and what this
machine accepts.
"""

from __future__ import annotations

import re

import torch

from mm_llama.errors import InputError

_NAME = re.compile(r"^(cpu|cuda|mps)(:(\d+))?$")


def device_problem(value: object, what: str = "device") -> str | None:
    """Why `value` is not a device name mm-llama accepts anywhere ("auto", "cpu", "cuda", "cuda:N", "mps"), or None.
    Only the spelling is checked: whether this machine has the device is `resolve_device`'s job."""
    if isinstance(value, torch.device) or (isinstance(value, str) and (value == "auto" or _NAME.match(value))):
        return None
    return f"{what} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}"


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names + (["mps"] if torch.backends.mps.is_available() else [])


def resolve_device(value: str | torch.device, what: str = "device") -> torch.device:
    """`value` as a device this machine has; "auto" is the first GPU when there is one, else the CPU.

    Args:
        value: a name `device_problem` accepts, or a `torch.device`.
        what: how the value was given (e.g. "--device"), repeated in the error.
    Returns:
        the device; `InputError` naming `value` and the devices available here otherwise.
    """
    if problem := device_problem(value, what):
        raise InputError(problem)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    here = available_devices()
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"{what} {value}: this machine has no such CUDA device; available: {', '.join(here)}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{what} {value}: MPS is not available here; available: {', '.join(here)}")
    return device


def check_dtype(dtype: object, what: str = "dtype") -> None:
    """`InputError` unless `dtype` is a floating-point `torch.dtype` or None (keep the checkpoint's)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"{what} must be a floating-point torch.dtype (e.g. torch.bfloat16) or None (as stored), "
                         f"got {dtype!r}")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(value: str | torch.dtype, device: torch.device, what: str = "dtype") -> torch.dtype:
    """`value` as the weights' dtype on `device`; "auto" is bf16 on a CUDA GPU and fp32 elsewhere.

    Args:
        value: "auto", "bf16", "fp16", "fp32" or a floating-point `torch.dtype`.
        device: where the weights will live (decides "auto").
        what: how the value was given (e.g. "--dtype"), repeated in the error.
    """
    if isinstance(value, torch.dtype):
        check_dtype(value, what)
        return value
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(value, str) or value not in DTYPES:
        raise InputError(f"{what} must be 'auto', {', '.join(repr(k) for k in DTYPES)} or a torch.dtype, got {value!r}")
    return DTYPES[value]
