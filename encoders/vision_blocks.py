"""Building blocks of the image encoder (`encoders/vision.py`), with the parameter names of Meta's Llama 3.2 reference.

Shape legend: N images (batch x images per sample), T tile slots per image (`max_tiles`), P patches per tile,
L tokens per tile (P + 1 class token, before padding), Lp padded tokens per tile, S = T * Lp, D width, H heads,
Hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.image_transform import supported_aspect_ratios


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


def ratio_tile_index(max_tiles: int) -> torch.Tensor:
    """(n_ratios + 1, max_tiles) long: for aspect-ratio id k and tile slot t, 1 + the row-major position (i, j) in a
    [max_tiles, max_tiles] grid of the embedding that tile gets (i * max_tiles + j), or 0 for "none" (empty slots and
    the padding id 0). Tiles are numbered row-major over the (h, w) layout, as in Meta's `embedding[:h, :w]`."""
    ratios = supported_aspect_ratios(max_tiles)
    index = torch.zeros(len(ratios) + 1, max_tiles, dtype=torch.long)
    for k, (h, w) in enumerate(ratios, start=1):
        for t in range(h * w):
            index[k, t] = 1 + (t // w) * max_tiles + t % w
    return index


def gather_tile_grid(grid: torch.Tensor, index: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
    """Per-image embeddings from a Meta grid [M, M, n, D]: (N,) ids -> (N, M, n, D), zeros where no tile is.

    Equivalent to Meta's Python loop `x[i, :h*w] += grid[:h, :w].reshape(h*w, n, D)`, without a loop over images."""
    m, _, n, d = grid.shape
    table = torch.cat([grid.new_zeros(1, n, d), grid.reshape(m * m, n, d)])  # (1 + M*M, n, D); row 0 = none
    return table[index[aspect_ratio_ids]]  # (N, M, n, D)


class TilePositionEmbedding(nn.Module):
    """Gated per-tile embedding chosen by the image's aspect ratio (Meta's `TilePositionEmbedding`): one D-vector per
    tile slot, added to every token of the tile, times tanh(gate). Zero gate = identity."""

    def __init__(self, width: int, max_tiles: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(max_tiles, max_tiles, 1, width))
        self.gate = nn.Parameter(torch.zeros(1))
        self.register_buffer("_tile_index", ratio_tile_index(max_tiles), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding, std=self.embedding.shape[-1] ** -0.5)
        nn.init.zeros_(self.gate)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, T, L, D), aspect_ratio_ids (N,) -> (N, T, L, D)."""
        emb = gather_tile_grid(self.embedding, self._tile_index, aspect_ratio_ids)  # (N, T, 1, D)
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
        real = (torch.arange(padded_tokens, device=device) < n_tokens).repeat(n_tiles)[None]  # (1, S)
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
