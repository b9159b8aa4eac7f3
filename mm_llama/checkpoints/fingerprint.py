"""A cheap fingerprint of a trunk's weights: how an adapter checkpoint recognises the trunk it was trained on.

It hashes (sha256) the sorted Meta-style tensor names, their shapes, and three windows of `WINDOW` contiguous elements
of each tensor (the first, the middle and the last, in row-major order; a small tensor whole), every value rounded to
bf16. So it reads about 3 × 4 KiB of each of an 8B trunk's 291 tensors, a few pages apiece of a memory-mapped file,
instead of 16 GB.

What it detects: a different trunk: another model, another size, or the same trunk trained further (an update moves
nearly every element, and among the ~900,000 sampled values of an 8B trunk some cross a bf16 rounding step even at a
small learning rate).
What it does not detect: corruption of an element outside the windows (a flipped bit in an unsampled value), or a
change smaller than bf16's resolution. It is a label that says "same trunk", not a checksum of the files.
What it ignores on purpose: the storage dtype (fp32 or bf16 weights of the same trunk agree; fp16 ones may not, as
fp16 rounds differently) and the format (Meta, Hugging Face and mm-llama directories are read into the same Meta
names and layout first); a tied output head, which some formats store as a copy and others omit.
"""

from __future__ import annotations

import hashlib

import torch

SCHEME = "sha256-bf16-3x1024"  # stored as the prefix of the fingerprint: a later scheme is told apart, not mismatched
WINDOW = 1024


def _windows(tensor: torch.Tensor) -> list[torch.Tensor]:
    # A view for the contiguous tensors every reader returns (a non-contiguous one is copied here: correct, slower).
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n <= 3 * WINDOW:
        return [flat]
    middle = n // 2 - WINDOW // 2
    return [flat[:WINDOW], flat[middle:middle + WINDOW], flat[n - WINDOW:]]


def trunk_fingerprint(state: dict[str, torch.Tensor], *, tie_embeddings: bool) -> str:
    """The fingerprint of a trunk's weights (see the module docstring for what it does and does not tell apart).

    Args:
        state: the trunk's state dict with Meta's names, as `read_checkpoint` returns it (or a `Llama`'s).
        tie_embeddings: the config's field: a tied `output.weight` is left out.

    Returns:
        "sha256-bf16-3x1024:<64 hex digits>".
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        if tie_embeddings and name == "output.weight":
            continue
        tensor = state[name]
        digest.update(f"{name} {tuple(tensor.shape)}\n".encode())
        for window in _windows(tensor):
            values = window.to(device="cpu", dtype=torch.bfloat16).contiguous()
            digest.update(values.view(torch.int16).numpy().tobytes())
    return f"{SCHEME}:{digest.hexdigest()}"
