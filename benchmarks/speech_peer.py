"""What the speech benchmarks share (`speech_latency.py`, `speech_pretrain_throughput.py`): the peer, torchaudio's
`Conformer` at our encoder's sizes, and a CUDA-synchronised median timer. Run from the repository root as
`python benchmarks/<script>.py` (this folder is then on the import path)."""

from __future__ import annotations

import statistics
import time

import torch
import torchaudio

from encoders.speech import SpeechEncoderConfig


class Peer(torch.nn.Module):
    """torchaudio's Conformer at our encoder's sizes, behind the same stacking and projection; it returns what ours
    does: (frames (B, S, D), lengths (B,))."""

    def __init__(self, c: SpeechEncoderConfig):
        super().__init__()
        self.stack = c.stack
        self.input_projection = torch.nn.Linear(c.stack * c.n_mels, c.dim)
        self.conformer = torchaudio.models.Conformer(input_dim=c.dim, num_heads=c.n_heads, ffn_dim=c.ffn_dim,
                                                     num_layers=c.n_layers, depthwise_conv_kernel_size=c.conv_kernel)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, n = mel.shape
        x = self.input_projection(mel[:, : T // self.stack * self.stack].reshape(B, -1, self.stack * n))
        return self.conformer(x, lengths // self.stack)


def timed(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup`."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)
