"""Building blocks of the image encoder (`encoders/vision.py`), with the parameter names of Meta's Llama 3.2 reference.

Shape legend: N images (batch x images per sample), T tile slots per image (`max_tiles`), P patches per tile,
L tokens per tile (P + 1 class token, before padding), Lp padded tokens per tile, S = T * Lp, D width, H heads,
Hd head dim; in the tile-embedding tables M = T and R = len(supported_aspect_ratios(M)) (8 for M = 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.image_transform import supported_aspect_ratios
from mm_llama.errors import CheckpointError

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def cached_constant(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()`, built once per `key` and reused: for the fixed tables a forward would otherwise rebuild from aranges
    on every call (a few kernel launches each, in a training step bound by launches). `key` names everything the
    table depends on (what it is, its sizes, device and dtype). The table is shared: never modify it in place.

    Built outside inference mode, so that a table first made under generation's `torch.inference_mode` may still be
    saved for backward by a later training step. Under torch.compile it is built in the graph, and tensor subclasses
    (fake tensors) are never cached."""
    if torch.compiler.is_compiling():
        return make()
    table = _CONSTANTS.get(key)
    if table is None:
        with torch.inference_mode(False):
            table = make()
        if type(table) is torch.Tensor:
            if len(_CONSTANTS) >= 64:  # a few shapes x devices x dtypes in practice; never grows without bound
                _CONSTANTS.clear()
            _CONSTANTS[key] = table
    return table


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches -> D, no bias. The weight is stored as Meta's `conv1._linear.weight` [D, 3*p*p]
    (unfold + linear); the forward runs the equivalent strided convolution on the same parameter."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self._linear = nn.Linear(3 * patch_size * patch_size, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, D), patches in row-major order."""
        p = self.patch_size
        # nn.Unfold orders a patch's values as (channel, row, column), the layout of a conv weight [D, 3, p, p].
        weight = self._linear.weight.view(-1, 3, p, p)
        x = F.conv2d(x, weight, stride=p)  # (N, D, g, g)
        return x.flatten(2).transpose(1, 2)  # (N, P, D)


def grid_to_table(grid: torch.Tensor) -> torch.Tensor:
    """Meta's tile-embedding grid -> the per-aspect-ratio table the encoder holds (what HF's converter precomputes).

    Args:
        grid: [M, M, n, D]; tile t of an (h, w) image reads `grid[t // w, t % w]` (Meta's `grid[:h, :w]`, row-major).

    Returns:
        [R + 1, M, n, D] with R = len(supported_aspect_ratios(M)): row k holds the M tile slots of ratio id k; row 0
        (padding image) and the slots past h * w are zeros, which Meta's `x[:h*w] += grid[:h, :w]` leaves untouched.
    """
    m, _, n, d = grid.shape
    table = grid.new_zeros(len(supported_aspect_ratios(m)) + 1, m, n, d)
    for k, (h, w) in enumerate(supported_aspect_ratios(m), start=1):
        table[k, : h * w] = grid[:h, :w].reshape(h * w, n, d)
    return table


def table_to_grid(table: torch.Tensor, name: str) -> torch.Tensor:
    """The inverse of `grid_to_table`, for writing Meta's format.

    Args:
        table: [R + 1, M, n, D] per-aspect-ratio table.
        name: the parameter's name, for the error message.

    Returns:
        [M, M, n, D] grid; entries no aspect ratio reads (e.g. [1, 2] for M = 4) are zeros.

    Raises:
        CheckpointError: the table is not `grid_to_table` of any grid (aspect ratios disagree on a shared tile, or
            row 0 / empty tile slots are non-zero), as after fine-tuning in transformers.
    """
    _, m, n, d = table.shape
    grid = table.new_zeros(m, m, n, d)
    for k, (h, w) in enumerate(supported_aspect_ratios(m), start=1):
        grid[:h, :w] = table[k, : h * w].reshape(h, w, n, d)
    if not torch.equal(grid_to_table(grid), table):
        raise CheckpointError(f"{name}: Meta's format keeps one [{m}, {m}] grid per tile embedding, but in this "
                              "per-aspect-ratio table the ratios disagree on a shared tile, or the padding row / "
                              "empty tile slots are not zero (e.g. an encoder fine-tuned in transformers); it cannot "
                              "be written in Meta's format: write the 'hf' or 'ours' format instead")
    return grid


class TilePositionEmbedding(nn.Module):
    """Gated per-tile embedding chosen by the image's aspect ratio (Meta's `TilePositionEmbedding`, held as HF's
    per-ratio table [R + 1, T, 1, D]): one D-vector per tile slot, added to every token of the tile, times tanh(gate).
    Zero gate = identity."""

    def __init__(self, width: int, max_tiles: int):
        super().__init__()
        n_ratios = len(supported_aspect_ratios(max_tiles))
        self.embedding = nn.Parameter(torch.zeros(n_ratios + 1, max_tiles, 1, width))
        self.gate = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        # A random grid expanded to the table: a fresh embedding is grid-consistent, writable in Meta's format.
        _, m, _, d = self.embedding.shape
        grid = self.embedding.new_empty(m, m, 1, d)
        nn.init.normal_(grid, std=d**-0.5)
        with torch.no_grad():
            self.embedding.copy_(grid_to_table(grid))
        nn.init.zeros_(self.gate)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, T, L, D), aspect_ratio_ids (N,) -> (N, T, L, D)."""
        emb = self.embedding[aspect_ratio_ids]  # (N, T, 1, D): every slot of the row, as HF
        return x + emb.to(x.dtype) * self.gate.tanh()


def encoder_attention_mask(tile_mask: torch.Tensor, n_tokens: int, padded_tokens: int, dtype: torch.dtype
                           ) -> torch.Tensor:
    """Additive mask (N, 1, S, S) of Meta's `build_encoder_attention_mask`: a token is "void" when it is a pad token
    or belongs to an empty tile slot, and only void<->void pairs are blocked (finfo.min). Real tokens DO attend to pad
    tokens and to empty tiles; this is what the checkpoints were trained with (research/vision.md §2.2 step 7).
    The additive finfo.min (not -inf or a bool mask) keeps all-void rows finite: they attend uniformly."""
    n, t = tile_mask.shape
    void = (~tile_mask)[:, :, None].expand(n, t, padded_tokens).clone()  # (N, T, Lp)
    void[:, :, n_tokens:] = True
    void = void.reshape(n, t * padded_tokens, 1).to(dtype)  # (N, S, 1)
    return (void @ void.transpose(1, 2) * torch.finfo(dtype).min)[:, None]  # (N, 1, S, S)


@dataclass(frozen=True)
class PadTokens:
    """The attention mask when every tile slot of every image is real: then only the pad tokens at the end of each
    tile are void, at the same positions in every image, and `encoder_attention_mask` reduces to "pad queries do not
    see pad keys". Attention runs unmasked for every row (fused kernels: on an H200 cuDNN's takes 0.61 ms for a
    4-tile 560-px image against 1.05 ms with the additive mask, forward; 2.3 vs 4.9 ms forward + backward) and the
    few pad rows are then recomputed over the real keys only. Same result, up to rounding."""

    n_tiles: int
    n_tokens: int  # real tokens per tile (L)
    padded_tokens: int  # tokens per tile with the pad (Lp)
    real: torch.Tensor  # (1, T * Lp) bool: the keys a pad query sees

    @classmethod
    def layout(cls, n_tiles: int, n_tokens: int, padded_tokens: int, device: torch.device) -> PadTokens:
        real = cached_constant(("pad_tokens", n_tiles, n_tokens, padded_tokens, torch.device(device)), lambda: (
            torch.arange(padded_tokens, device=device) < n_tokens).repeat(n_tiles)[None])  # (1, S)
        return cls(n_tiles, n_tokens, padded_tokens, real)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(N, H, S, Hd) each -> (N, H, S, Hd)."""
        out = F.scaled_dot_product_attention(q, k, v)  # right for every real row: they see every token
        t, n, lp = self.n_tiles, self.n_tokens, self.padded_tokens
        if n == lp:
            return out
        nb, h, s, hd = q.shape
        # Slices and a concatenation rather than index_copy: torch.compile's backward fails on the latter (2.11).
        pad_q = q.view(nb, h, t, lp, hd)[:, :, :, n:].reshape(nb, h, t * (lp - n), hd)
        fixed = F.scaled_dot_product_attention(pad_q, k, v, attn_mask=self.real)  # key mask: no K/V copies
        out = torch.cat([out.view(nb, h, t, lp, hd)[:, :, :, :n], fixed.view(nb, h, t, lp - n, hd)], dim=3)
        return out.view(nb, h, s, hd)


AttentionMask = torch.Tensor | PadTokens | None


class ImageAttention(nn.Module):
    """Multi-head self-attention over all tokens of an image; biases only for open_clip towers."""

    def __init__(self, width: int, n_heads: int, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(width, width, bias=bias)
        self.wk = nn.Linear(width, width, bias=bias)
        self.wv = nn.Linear(width, width, bias=bias)
        self.wo = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """x (N, S, D), mask: (N, 1, S, S) additive, `PadTokens` or None (no mask) -> (N, S, D)."""
        n, s, d = x.shape
        q, k, v = (w(x).view(n, s, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))  # (N,H,S,Hd)
        if isinstance(mask, PadTokens):
            out = mask.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, S, Hd)
        return self.wo(out.transpose(1, 2).reshape(n, s, d))


class ImageFeedForward(nn.Module):
    """c_fc -> exact GELU -> c_proj, both with bias (Meta's `ImageFeedForward`, CLIP's MLP)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ImageTransformerBlock(nn.Module):
    """Pre-norm ViT block. Gated blocks (the global transformer) scale both residual branches by tanh of a
    zero-initialised gate, so a freshly added block is the identity (Llama 3 §7.2; STYLE rule 5)."""

    def __init__(self, width: int, n_heads: int, mlp_dim: int, norm_eps: float, attn_bias: bool, gated: bool):
        super().__init__()
        self.attn = ImageAttention(width, n_heads, attn_bias)
        self.ln_1 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = ImageFeedForward(width, mlp_dim)
        self.ln_2 = nn.LayerNorm(width, eps=norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """(N, S, D) -> (N, S, D)."""
        attn = self.attn(self.ln_1(x), mask)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        ffn = self.mlp(self.ln_2(x))
        return x + (self.gate_ffn.tanh() * ffn if self.gated else ffn)


class ImageTransformer(nn.Module):
    """A stack of `ImageTransformerBlock`s (`resblocks`) that can hand back per-block features."""

    def __init__(self, n_layers: int, width: int, n_heads: int, mlp_dim: int, norm_eps: float, attn_bias: bool,
                 gated: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ImageTransformerBlock(width, n_heads, mlp_dim, norm_eps, attn_bias, gated) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor, mask: AttentionMask, layers: tuple[int, ...] = (),
                mode: str = "input") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, S, D) -> (final (N, S, D), [(N, S, D) per entry of `layers`]).

        mode "input": feature i is the input of block i (Meta's reference); "output": the output of block i
        (Hugging Face transformers >= 4.56)."""
        features = []
        for i, block in enumerate(self.resblocks):
            if mode == "input" and i in layers:
                features.append(x)
            x = block(x, mask)
            if mode == "output" and i in layers:
                features.append(x)
        return x, features


def patch_position_table(side: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions of a tile's tokens, (1 + side * side, dim): row 0 (the class token) is zero; patch
    (r, c) holds sin and cos of r and of c at dim // 4 frequencies each, from 1 down to 1/100 radian per patch
    (geometric), zero-padded to `dim`. Values lie in [-1, 1]. See `VisionConfig.patch_position_features`."""
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(100.0) / max(quarter, 1)))
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    r, c = rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs  # (P, dim // 4)
    patches = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1)  # (P, 4 * quarter)
    table = torch.zeros(1 + side * side, dim, device=device, dtype=torch.float32)
    table[1:, : 4 * quarter] = patches
    return table.to(dtype or torch.float32)
