"""The Llama 3 / 3.1 / 3.2-text trunk, with Meta's parameter names.

Parameter names follow Meta's reference `model.py` exactly (`tok_embeddings`, `layers.N.attention.wq/wk/wv/wo`,
`layers.N.feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `norm`, `output`), so a Meta `consolidated.00.pth`
loads with `strict=True` and no key map. RoPE keeps Meta's interleaved pair layout (Hugging Face permutes wq/wk to
use its rotate-half layout instead; `checkpoints.py` undoes that).

Shape legend: B batch, T query positions, S key positions (cache length), D model dim, H heads, K kv heads,
Hd head dim, V vocabulary.

This file holds no device, parallelism, compile or inference-mode code (STYLE rule 7): generation lives in
`generate.py`, training in `train/`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.errors import ConfigError


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width rule: 2/3 of 4*dim, times the multiplier (floored), rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class LlamaConfig:
    """Architecture of a Llama 3 trunk; field names follow Meta's `params.json` (FFN width: `ffn_hidden_dim`)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # Llama 3.1 frequency scaling ("values obtained from grid search", Meta's `apply_scaling`). Meta's reference code
    # always uses factor 8; the 3.2 1B/3B releases were trained with 32 (their HF config.json says so).
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    max_seq_len: int = 8192  # longest sequence generation allocates for; RoPE itself has no table limit
    tie_embeddings: bool = False  # 3.2 1B/3B share tok_embeddings and output

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
            if self.head_dim % 2:
                problems.append(f"head dim {self.head_dim} must be even for RoPE")
        if problems:
            raise ConfigError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "LlamaConfig":
        """Build from a dict, rejecting keys this class does not know (naming them, the source and the known keys)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown LlamaConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """One of `LLAMA_PRESETS` ("debug", "1B", "3B", "8B", "70B", "405B"), optionally with fields overridden."""
        if name not in LLAMA_PRESETS:
            raise ConfigError(f"unknown Llama preset {name!r}; known presets: {sorted(LLAMA_PRESETS)}")
        return cls.from_dict({**LLAMA_PRESETS[name], **overrides}, source=f"preset {name!r}")


# Numbers from the params.json of each Meta release (llama-models sku list / the released checkpoints).
LLAMA_PRESETS: dict[str, dict] = {
    # Tiny, for tests and CPU runs: GQA (4 heads, 2 kv heads), scaled RoPE, untied head; the vocabulary of the shapes
    # world's tokenizer (`mm_llama.data.world_tokenizer`: 256 bytes + 256 merges + 256 special tokens).
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=768, multiple_of=16,
                  use_scaled_rope=True, rope_original_context=64, max_seq_len=256),
    # Llama 3.2 1B: params.json dim 2048, 16 layers, 32/8 heads, ffn_dim_multiplier 1.5, multiple_of 256, tied head;
    # HF config.json rope_scaling factor 32.
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
               use_scaled_rope=True, rope_scaling_factor=32.0, max_seq_len=131072, tie_embeddings=True),
    # Llama 3.2 3B: dim 3072, 28 layers, 24/8 heads, ffn_dim_multiplier 1.0, multiple_of 256, tied head, factor 32.
    "3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
               use_scaled_rope=True, rope_scaling_factor=32.0, max_seq_len=131072, tie_embeddings=True),
    # Llama 3.1 8B: dim 4096, 32 layers, 32/8 heads, ffn_dim_multiplier 1.3, multiple_of 1024 (FFN 14336).
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
               use_scaled_rope=True, max_seq_len=131072),
    # Llama 3.1 70B: dim 8192, 80 layers, 64/8 heads, ffn_dim_multiplier 1.3, multiple_of 4096 (FFN 28672).
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                use_scaled_rope=True, max_seq_len=131072),
    # Llama 3.1 405B: dim 16384, 126 layers, 128/8 heads, ffn_dim_multiplier 1.2, multiple_of 4096 (FFN 53248).
    "405B": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096,
                 use_scaled_rope=True, max_seq_len=131072),
}


def rope_frequencies(config: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies of RoPE, (Hd/2,) fp32, with Llama 3.1 scaling when `use_scaled_rope`."""
    hd = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if not config.use_scaled_rope:
        return freqs
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_context
    wavelen = 2 * math.pi / freqs
    # Long wavelengths (> old_context / low) are slowed by `factor`; short ones (< old_context / high) kept;
    # the band between is interpolated smoothly.
    scaled = torch.where(wavelen > old_context / low, freqs / factor, freqs)
    smooth = (old_context / wavelen - low) / (high - low)
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_band, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """cos and sin of the RoPE angles for `positions` (B, T) or (T,): (B, T, Hd/2, 2) or (T, Hd/2, 2), fp32, stacked
    last (the layout of the complex cos + i sin). Computed once per forward and shared by every layer."""
    angles = positions.float()[..., None] * inv_freq
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, Hd) by `rope_table`'s angles, in fp32: Meta's complex
    product (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos).

    Eager, it is that complex product: one kernel forward and two backward instead of seven and about ten, with
    the same fp32 products and sums (on the CPU bit-equal to the formula written out, gradients too; a CUDA kernel
    may fuse a product into the sum: fp32 rounding). torch.compile generates no code for complex ops, so a compiled
    graph gets the formula written out, which it fuses.
    """
    if table.dim() == 3:  # (T, Hd/2, 2): same positions for every row of the batch
        table = table[None]
    table = table[:, :, None]  # (B, T, 1, Hd/2, 2)
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, Hd/2, 2)
    if torch.compiler.is_compiling():
        real, imag, cos, sin = pairs[..., 0], pairs[..., 1], table[..., 0], table[..., 1]
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.view_as_complex(table))
    return rotated.flatten(-2).type_as(x)


class KVCacheLike(Protocol):
    """What attention needs of a KV cache (`generate.KVCache` is the implementation)."""

    def update(self, layer_id: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: Meta's order (HF casts after scaling; equal in fp32). F.rms_norm
        # normalises bf16/fp16 in fp32 and returns the input's dtype: one fused kernel each way on CUDA
        # (`_fused_rms_norm`), the pow/mean/rsqrt/mul of the formula elsewhere. It takes the weight only in fp32,
        # where scaling inside it rounds as the separate product does; in bf16 that would skip Meta's cast first.
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCacheLike | None = None, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        # q and k rotated together: one set of RoPE ops for both (the same arithmetic on the same values)
        q, k = apply_rope(torch.cat((q, k), dim=2), rope).split((self.n_heads, self.n_kv_heads), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, Hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, cache_pos, k, v)  # (B, K, S, Hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        self.attention = Attention(config, layer_id)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCacheLike | None = None, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Llama 3 decoder. `forward` maps token ids (or input embeddings) to fp32 logits.

    The pieces `embed`, `rope`, `layers`, `head` are public so that `MMLlama` can run its own layer loop (which also
    hands out hidden states after any layer: `MMLlama.step(..., taps=...)`).

    Masks are boolean, True where a query may attend to a key, broadcastable to (B, 1, T, S). Without a mask and
    without a cache the attention is causal over the T positions.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Recomputed rather than loaded: not part of any checkpoint.
        self.register_buffer("rope_inv_freq", rope_frequencies(config), persistent=False)
        self.tie_weights()

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
                        ) -> "Llama":
        """Load a Meta (`params.json` + `consolidated.NN.pth`) or Hugging Face (`config.json` + safetensors)
        checkpoint directory, auto-detected. See `mm_llama.checkpoints.load_llama`."""
        from mm_llama.checkpoints import load_llama

        return load_llama(path, dtype=dtype, device=device)

    def tie_weights(self) -> None:
        """Share `output.weight` with `tok_embeddings.weight` when the config says the head is tied."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self) -> None:
        """Recompute the RoPE frequencies on the device of the weights (after loading onto the meta device)."""
        self.rope_inv_freq = rope_frequencies(self.config, device=self.tok_embeddings.weight.device)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: normal(0, std) matrices, output projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                scale = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
                nn.init.normal_(p, 0.0, scale, generator=generator)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) embeddings."""
        return self.tok_embeddings(tokens)

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """The RoPE table (`rope_table`) for positions (T,) shared by the batch, or (B, T) per row (left-padded
        batches): what every layer's forward takes as `rope`."""
        return rope_table(positions, self.rope_inv_freq)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last hidden state -> (B, T, V) fp32 logits."""
        return self.output(self.norm(h)).float()

    def _inputs(self, tokens: torch.Tensor | None, embeddings: torch.Tensor | None,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens or embeddings")
        h = self.embed(tokens) if tokens is not None else embeddings
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        return h, positions

    def forward(self, tokens: torch.Tensor | None = None, *, embeddings: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCacheLike | None = None, cache_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for `tokens` (B, T) or `embeddings` (B, T, D).

        Args:
            positions: RoPE positions, (T,) or (B, T); default 0..T-1.
            mask: boolean (B|1, 1, T, S), True = may attend; default causal (required with a cache).
            cache, cache_pos: KV cache and the (T,) cache slots the new keys/values are written to.
            last_only: return logits for the last position only, (B, 1, V): what a prefill needs.
        Returns:
            (B, T, V) fp32 logits.
        """
        if cache is not None and (mask is None or cache_pos is None):
            raise ValueError("a KV cache needs an explicit mask and cache_pos (see generate.py)")
        h, positions = self._inputs(tokens, embeddings, positions)
        rope = self.rope(positions)
        for layer in self.layers:
            h = layer(h, rope, mask, cache, cache_pos)
        return self.head(h[:, -1:] if last_only else h)
