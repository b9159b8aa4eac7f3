"""The speech adapter (Llama 3 paper §8.2.1): the speech encoder's 40 ms frames -> embeddings in the trunk's token
space, spliced into the token stream between `<|speech_start|>` and `<|speech_end|>` (no cross-attention).

A convolution of kernel 3 and stride 2 (80 ms frames), one rotary Transformer layer of width 3072 with an FFN of 4096,
and a linear map to the trunk's width: about 100M parameters (102M for the 8B trunk, 115M for the 70B).

What the paper leaves open, and the choices here (`SpeechAdapterConfig`):
- the convolution maps the encoder's 1536 channels to the layer's 3072, padding 1: S encoder frames give ceil(S / 2)
  positions (60 s of audio = 1,500 encoder frames = 750 positions);
- the layer is pre-LayerNorm, 24 heads of 128, RoPE base 10,000, and a SwiGLU FFN as the trunk's (with a plain
  two-matrix FFN the adapter would have 90M parameters; both are "about 100M");
- padding never reaches a real position: the convolution sees padded frames as zeros and attention masks them.

Shapes: B utterances, S encoder frames, P = ceil(S / 2) positions, D the trunk's width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from encoders.speech import SelfAttention, check_heads_and_kernel, encoder_lengths, padding_masks, rope_inv_freq
from mm_llama.errors import ConfigError
from mm_llama.llama import FeedForward, rope_table
from mm_llama.values import is_finite_number


@dataclass
class SpeechAdapterConfig:
    in_dim: int = 1536  # the speech encoder's width (§8.2.1)
    dim: int = 3072  # §8.2.1: "latent dimension 3072"
    n_heads: int = 24  # open: heads of 128
    ffn_dim: int = 4096  # §8.2.1
    conv_kernel: int = 3  # §8.2.1
    conv_stride: int = 2  # §8.2.1: 80 ms frames
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    # The longest utterance one span holds (§8.3.1 crops pre-training audio to 60 s: 750 positions). Longer audio
    # is split into chunks of at most this length, a span each (`encoders.utterances`), never truncated.
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("in_dim", "dim", "n_heads", "ffn_dim", "conv_kernel", "conv_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"speech adapter {name} must be a positive integer, got {value!r}")
        check_heads_and_kernel("speech adapter", self.dim, self.n_heads, self.conv_kernel)
        if not is_finite_number(self.max_seconds) or self.max_seconds < 1:
            raise ConfigError(f"speech adapter max_seconds must be a number >= 1, got {self.max_seconds!r}")


def adapter_lengths(encoder_lengths: torch.Tensor, config: SpeechAdapterConfig) -> torch.Tensor:
    """Positions of utterances of `encoder_lengths` encoder frames: the convolution's output length (padding K // 2),
    ceil(S / 2) for the paper's kernel 3, stride 2."""
    pad = config.conv_kernel // 2
    return (encoder_lengths + 2 * pad - config.conv_kernel) // config.conv_stride + 1


def speech_positions(mel_lengths: torch.Tensor, stack: int, config: SpeechAdapterConfig) -> torch.Tensor:
    """Token positions of utterances of `mel_lengths` mel frames: the adapter's output length after the encoder's
    `stack`-frame stacking (6,000 frames, 60 s -> 1,500 encoder frames -> 750 positions)."""
    return adapter_lengths(encoder_lengths(mel_lengths, stack), config)


class SpeechAdapter(nn.Module):
    """(B, S, in_dim) encoder frames + lengths -> (B, P, trunk_dim) embeddings + lengths."""

    def __init__(self, config: SpeechAdapterConfig, trunk_dim: int):
        super().__init__()
        self.config = config
        self.conv = nn.Conv1d(config.in_dim, config.dim, config.conv_kernel, stride=config.conv_stride,
                              padding=config.conv_kernel // 2)
        self.attention = SelfAttention(config.dim, config.n_heads, config.norm_eps)
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)
        self.output = nn.Linear(config.dim, trunk_dim)
        self.register_buffer("inv_freq", rope_inv_freq(config.dim // config.n_heads, config.rope_theta),
                             persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE frequencies on the device of the weights (after loading onto the meta device)."""
        c = self.config
        self.inv_freq = rope_inv_freq(c.dim // c.n_heads, c.rope_theta).to(self.output.weight.device)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, S, in_dim) (`encoders.speech.SpeechEncoder`'s), lengths (B,) -> ((B, P, D), (B,))."""
        _, real_in = padding_masks(lengths.to(frames.device), frames.shape[1], frames.dtype)
        x = self.conv((frames * real_in).transpose(1, 2)).transpose(1, 2)  # (B, P, dim); padded frames read as zeros
        out_lengths = adapter_lengths(lengths.to(frames.device), self.config)
        key_mask, _ = padding_masks(out_lengths, x.shape[1], x.dtype)
        x = x + self.attention(x, rope_table(torch.arange(x.shape[1], device=x.device), self.inv_freq), key_mask)
        x = x + self.feed_forward(self.ffn_norm(x))
        return self.output(x), out_lengths
