"""The speech encoder (Llama 3 paper §8.2.1): 80-dim log-mel frames (10 ms, `encoders.audio`) stacked 4 by 4 and
projected (40 ms frames), then a Conformer: 24 layers of width 1536, two Macaron FFNs of 4096, a depthwise
convolution of kernel 7 and rotary self-attention with 24 heads, about 1.0B parameters (`"paper"` preset).

What the paper leaves open, and the choices here (`SpeechEncoderConfig`):
- The layer is Gulati et al.'s Conformer block with torchaudio's parameter layout (biases, pre-LayerNorms, a final
  LayerNorm per layer): 41.73M parameters per layer at the paper's sizes, 1.002B in all with the input projection.
- Padding never reaches a real frame: attention masks padded keys, the convolution sees padded frames as zeros (as
  an utterance alone sees the zeros around it), and the convolution's norm is a per-frame LayerNorm, not BatchNorm
  (whose statistics would include padding and differ with the batch). An utterance's output is the same alone and
  batched (`tests/test_speech_encoder.py`).
- RoPE over the 40 ms frame index, base 10,000 (the paper gives none); SiLU in the FFNs and the convolution (Gulati).
- Lengths: T mel frames give ceil(T / 4) encoder frames; the last group is zero-padded. 60 s = 6,000 mel frames =
  1,500 encoder frames (750 positions after the adapter's stride 2).

Shapes: B utterances, T mel frames, S = ceil(T / 4) encoder frames, D width, H heads, Hd = D / H.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.errors import ConfigError
from mm_llama.llama import apply_rope, rope_table


@dataclass
class SpeechEncoderConfig:
    n_mels: int = 80  # §8.2.1: 80-dim mel-spectrogram
    stack: int = 4  # §8.2.1: stride-4 stacking -> 40 ms frames
    dim: int = 1536
    n_layers: int = 24
    n_heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 7
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"speech encoder {f.name} must be a positive integer, got {value!r}")
        check_heads_and_kernel("speech encoder", self.dim, self.n_heads, self.conv_kernel)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"speech encoder dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> SpeechEncoderConfig:
        """One of `SPEECH_ENCODER_PRESETS` ("paper", "debug"), with fields overridden."""
        if name not in SPEECH_ENCODER_PRESETS:
            raise ConfigError(f"unknown speech encoder preset {name!r}; known presets: "
                              f"{sorted(SPEECH_ENCODER_PRESETS)}")
        values = {**SPEECH_ENCODER_PRESETS[name], **overrides}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown speech encoder key(s) {unknown}; known keys: {[f.name for f in fields(cls)]}")
        return cls(**values)


def check_heads_and_kernel(what: str, dim: int, n_heads: int, conv_kernel: int) -> None:
    """ConfigError unless `dim` splits into `n_heads` heads of an even width (rotary pairs) and `conv_kernel` is odd
    (a centred window): the encoder's and the adapter's shared constraints."""
    if dim % n_heads or (dim // n_heads) % 2:
        raise ConfigError(f"{what} dim ({dim}) must split into n_heads ({n_heads}) heads of an even width (rotary "
                          "pairs)")
    if conv_kernel % 2 == 0:
        raise ConfigError(f"{what} conv_kernel must be odd (a centred window), got {conv_kernel}")


SPEECH_ENCODER_PRESETS: dict[str, dict] = {
    # Llama 3 paper §8.2.1: 24 Conformer layers, latent 1536, two Macaron FFNs of 4096, conv kernel 7, 24 rotary heads.
    "paper": dict(dim=1536, n_layers=24, n_heads=24, ffn_dim=4096, conv_kernel=7),
    # Tiny, for tests.
    "debug": dict(dim=64, n_layers=2, n_heads=4, ffn_dim=128, conv_kernel=7),
}


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE's inverse frequencies (Hd/2,) fp32, for `mm_llama.llama.rope_table`."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)


def padding_masks(lengths: torch.Tensor, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) lengths of n-frame rows -> the attention's key mask (B, 1, 1, n) bool and the frames' (B, n, 1) 0/1."""
    real = torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]  # (B, n)
    return real[:, None, None, :], real[..., None].to(dtype)


def encoder_lengths(mel_lengths: torch.Tensor, stack: int = 4) -> torch.Tensor:
    """Encoder frames of utterances of `mel_lengths` mel frames: ceil(T / stack)."""
    return (mel_lengths + stack - 1) // stack


class FeedForward(nn.Module):
    """LayerNorm, Linear D -> F, SiLU, Linear F -> D (one of the block's two Macaron halves)."""

    def __init__(self, c: SpeechEncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.w1, self.w2 = nn.Linear(c.dim, c.ffn_dim), nn.Linear(c.ffn_dim, c.dim)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(self.dropout(F.silu(self.w1(self.norm(x))))))


class SelfAttention(nn.Module):
    """Pre-LayerNorm rotary self-attention over the utterance's real frames (padded keys masked); also the speech
    adapter's."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), rope (S, Hd/2, 2), key_mask (B, 1, 1, S) True for real frames."""
        q, k, v = self.wqkv(self.norm(x)).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(2)  # (B, S, H, Hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=key_mask)  # (B, H, S, Hd)
        return self.dropout(self.wo(out.transpose(1, 2).flatten(2)))


class ConvModule(nn.Module):
    """Gulati's convolution module: pointwise conv to 2D, GLU, depthwise conv (kernel K), norm, SiLU, pointwise conv.
    The norm is a per-frame LayerNorm: BatchNorm's statistics would mix padding and other utterances in."""

    def __init__(self, c: SpeechEncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.pointwise_in = nn.Conv1d(c.dim, 2 * c.dim, 1)
        self.depthwise = nn.Conv1d(c.dim, c.dim, c.conv_kernel, padding=c.conv_kernel // 2, groups=c.dim)
        self.depthwise_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.pointwise_out = nn.Conv1d(c.dim, c.dim, 1)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), real (B, S, 1) True for real frames."""
        h = F.glu(self.pointwise_in(self.norm(x).transpose(1, 2)), dim=1)  # (B, D, S)
        h = self.depthwise(h * real.transpose(1, 2))  # padded frames are zeros, as beyond an utterance alone
        h = F.silu(self.depthwise_norm(h.transpose(1, 2))).transpose(1, 2)
        return self.dropout(self.pointwise_out(h).transpose(1, 2))  # (B, S, D)


class ConformerLayer(nn.Module):
    """x + FFN/2, + self-attention, + convolution, + FFN/2, then LayerNorm (Gulati et al. 2020, Macaron style)."""

    def __init__(self, c: SpeechEncoderConfig):
        super().__init__()
        self.ffn1, self.attention = FeedForward(c), SelfAttention(c.dim, c.n_heads, c.norm_eps, c.dropout)
        self.conv, self.ffn2 = ConvModule(c), FeedForward(c)
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, key_mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attention(x, rope, key_mask)
        x = x + self.conv(x, real)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


class SpeechEncoder(nn.Module):
    """(B, T, n_mels) log-mel frames + lengths -> (B, S, D) encoder frames + lengths (S = ceil(T / stack))."""

    def __init__(self, config: SpeechEncoderConfig):
        super().__init__()
        self.config = config
        self.input_projection = nn.Linear(config.stack * config.n_mels, config.dim)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.n_layers))
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE frequencies on the device of the weights (after loading onto the meta device)."""
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta).to(
            self.input_projection.weight.device)

    def stacked(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) -> (B, S, stack · n_mels), frames past each length zeroed first (so the last, partial group
        of an utterance is the same alone and batched)."""
        B, T, n_mels = mel.shape
        k = self.config.stack
        real = torch.arange(T, device=mel.device)[None, :] < lengths[:, None].to(mel.device)  # (B, T)
        mel = F.pad(mel * real[..., None], (0, 0, 0, (-T) % k))
        return mel.reshape(B, -1, k * n_mels)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, T, n_mels) (`encoders.audio.log_mel`, normalised), lengths (B,) mel frames -> ((B, S, D), (B,))."""
        if mel.dim() != 3 or mel.shape[-1] != self.config.n_mels:
            raise ValueError(f"speech encoder expects (B, T, {self.config.n_mels}) mel frames, got {tuple(mel.shape)}")
        # The range check reads the lengths back from the device, which a CUDA graph capture cannot do (the captured
        # lengths are checked once, at warm-up, before the capture) and which would break a compiled graph in two
        # (compiled, the composed model's lengths come from `Utterances`, which checked them).
        traced = torch.compiler.is_compiling() or (mel.is_cuda and torch.cuda.is_current_stream_capturing())
        out_of_range = not traced and bool(((lengths < 1) | (lengths > mel.shape[1])).any())
        if lengths.shape != mel.shape[:1] or out_of_range:
            raise ValueError(f"speech encoder lengths must be (B,) in 1..{mel.shape[1]}, got {lengths.tolist()}")
        out_lengths = encoder_lengths(lengths, self.config.stack).to(mel.device)
        x = self.input_projection(self.stacked(mel, lengths))  # (B, S, D)
        key_mask, real = padding_masks(out_lengths, x.shape[1], x.dtype)
        rope = rope_table(torch.arange(x.shape[1], device=x.device), self.inv_freq)
        for layer in self.layers:
            x = layer(x, rope, key_mask, real)
        return x, out_lengths
