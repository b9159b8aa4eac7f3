"""Gated cross-attention image adapter (paper §7.2; Llama 3.2 Vision's layout, Meta's parameter names).

A block runs *before* scheduled trunk layers (3, 7, 11, … for 32 layers: spacing ceil(n_layers / n_blocks) counted
from the top). Each block:

    h   = x + tanh(gate_attn) · rows · wo(attn(q_norm(wq · norm(x)), k_norm(wk · vision), wv · vision))
    out = h + tanh(gate_ffwd) · rows · SwiGLU(ffn_norm(h))

`rows` zeroes the text positions that have seen no image yet (Meta applies it on both branches; HF transformers
only on the second, issue 39379 — `mask_attention_rows=False` reproduces that). Gates start at zero, so a fresh
adapter leaves the trunk's output unchanged. Keys and values of the vision tokens depend only on the image: they are
computed once per request (`kv`) and reused at every decode step.

Shapes: B batch, T text positions, N vision tokens (images × tiles × tokens per tile), D model dim, H heads,
K kv heads (the trunk's grouping), Hd head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.errors import ConfigError
from mm_llama.llama import FeedForward, LlamaConfig, RMSNorm


@dataclass
class CrossAttentionConfig:
    """The image adapter's own settings; its widths come from the trunk's `LlamaConfig`."""

    n_layers: int = 8  # 8 blocks for Llama 3.2 11B (32 trunk layers), 20 for 90B (80 trunk layers)
    mask_attention_rows: bool = True  # Meta: zero rows without an image on both branches; False: HF transformers

    def __post_init__(self) -> None:
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ConfigError(f"cross-attention n_layers must be a positive integer, got {self.n_layers!r}")


def fusion_schedule(n_trunk_layers: int, n_blocks: int) -> list[int]:
    """Trunk layer indices that a cross-attention block precedes (Meta's rule, counted from the top)."""
    if not 1 <= n_blocks <= n_trunk_layers:
        raise ConfigError(f"{n_blocks} cross-attention blocks cannot be spread over {n_trunk_layers} trunk layers")
    step = math.ceil(n_trunk_layers / n_blocks)
    return list(range(n_trunk_layers))[::-1][::step][:n_blocks][::-1]


class CrossAttention(nn.Module):
    def __init__(self, trunk: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = trunk.n_heads, trunk.n_kv_heads, trunk.head_dim
        self.wq = nn.Linear(trunk.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(trunk.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(trunk.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, trunk.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, trunk.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, trunk.norm_eps)

    def kv(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of projected vision tokens (B, N, D): each (B, K, N, Hd); no RoPE."""
        B, N, _ = vision.shape
        k = self.k_norm(self.wk(vision).view(B, N, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(vision).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
                ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Hd)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class CrossAttentionBlock(nn.Module):
    def __init__(self, trunk: LlamaConfig, config: CrossAttentionConfig):
        super().__init__()
        self.mask_attention_rows = config.mask_attention_rows
        self.attention_norm = RMSNorm(trunk.dim, trunk.norm_eps)
        self.attention = CrossAttention(trunk)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(trunk.dim, trunk.norm_eps)
        self.feed_forward = FeedForward(trunk.dim, trunk.ffn_hidden_dim)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
                mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); kv: cached (K, V), or the projected vision tokens (B, N, D) to compute them from here (inside
        this forward, where FSDP has gathered the weights); mask (B, 1, T, N) bool or None (all visible);
        rows (B, T, 1): 1 where the position has seen an image."""
        if isinstance(kv, torch.Tensor):
            kv = self.attention.kv(kv)
        attn = self.attention(self.attention_norm(x), kv, mask)
        if self.mask_attention_rows:
            attn = attn * rows
        h = x + self.gate_attn.tanh() * attn
        return h + self.gate_ffwd.tanh() * (self.feed_forward(self.ffn_norm(h)) * rows)


class ImageAdapter(nn.Module):
    """The cross-attention blocks and the trunk layers they precede. `cross_attention_layers.J` are Meta's names."""

    def __init__(self, trunk: LlamaConfig, config: CrossAttentionConfig):
        super().__init__()
        self.config = config
        self.schedule = fusion_schedule(trunk.n_layers, config.n_layers)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(trunk, config) for _ in self.schedule)

    def block_before(self) -> dict[int, int]:
        """trunk layer index -> index of the block that runs just before it."""
        return {layer: j for j, layer in enumerate(self.schedule)}

    def kv(self, vision: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of every block for projected vision tokens (B, N, D): the cross-attention cache."""
        return [block.attention.kv(vision) for block in self.cross_attention_layers]


def image_spans(tokens: list[int], image_id: int) -> list[tuple[int, int]]:
    """[start, end) of the text each `<|image|>` of one sample covers (Meta's `create_vision_mask` rule).

    An image covers the positions from its own token up to the next image token; consecutive image tokens all cover
    the text that follows the last of them; the last image covers the rest of the sequence.
    """
    locations = [i for i, t in enumerate(tokens) if t == image_id]
    ends = (locations[1:] + [len(tokens)]) if locations else []
    spans = [[start, end] for start, end in zip(locations, ends, strict=True)]
    following = len(tokens)
    for span in reversed(spans):
        if span[0] == span[1] - 1:  # immediately followed by another image: share that image's text
            span[1] = following
        following = span[1]
    return [(a, b) for a, b in spans]


def tile_visibility(tokens: torch.Tensor | list[list[int]], image_id: int, n_images: list[int],
                    tile_mask: torch.Tensor) -> torch.Tensor:
    """Which tiles each text position sees, on the CPU.

    Args:
        tokens: (B, T) ids (a tensor or lists); each sample's `<|image|>` count must equal its entry of `n_images`.
            Read on the host: a CUDA tensor here waits for the GPU's queue, a CPU tensor or lists do not.
        n_images: images per sample (the rest of the I image slots are padding).
        tile_mask: (B, I, Tiles) bool, True for real tiles (read on the host too).
    Returns:
        (B, T, I, Tiles) bool CPU tensor: position t of sample b sees tile j of image i.
    """
    rows_of_ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    tile_mask = tile_mask.cpu()
    B, T = len(rows_of_ids), len(rows_of_ids[0])
    n_slots = tile_mask.shape[1]  # image slots per sample (I)
    visible = torch.zeros(B, T, n_slots, dtype=torch.bool)  # text position b, t sees image i
    for b, row in enumerate(rows_of_ids):
        spans = image_spans(row, image_id)
        if len(spans) != n_images[b]:
            from mm_llama.errors import InputError

            raise InputError(f"sample {b} has {len(spans)} <|image|> token(s) but {n_images[b]} image(s); "
                             "each image needs exactly one <|image|> token where its text starts")
        for i, (start, end) in enumerate(spans):
            visible[b, start:end, i] = True
    return visible[:, :, :, None] & tile_mask[:, None, :, :]


def cross_attention_mask(tokens: torch.Tensor | list[list[int]], image_id: int, n_images: list[int],
                         tile_mask: torch.Tensor, tokens_per_tile: int, device: torch.device | str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of a batch for the cross-attention blocks.

    Args:
        tokens, image_id, n_images, tile_mask: as for `tile_visibility` (read on the host).
        tokens_per_tile: vision tokens per tile.
        device: where the masks go (default: the tokens' device); the copy does not wait for queued GPU work.
    Returns:
        mask (B, 1, T, I * Tiles * tokens_per_tile) bool: True where a text position may attend to a vision token.
        Rows that see no image are all True (a uniform, finite softmax) and are zeroed by `rows`;
        rows (B, T, 1) float: 1 where the position has seen an image.
    """
    from mm_llama.transfer import to_device

    if device is None:
        device = tokens.device if isinstance(tokens, torch.Tensor) else "cpu"
    per_tile = to_device(tile_visibility(tokens, image_id, n_images, tile_mask), device)  # (B, T, I, Tiles)
    B, T, n_slots, n_tiles = per_tile.shape
    mask = per_tile.repeat_interleave(tokens_per_tile, dim=3).reshape(B, 1, T, n_slots * n_tiles * tokens_per_tile)
    rows = mask.any(dim=-1)  # (B, 1, T)
    mask = mask | ~rows[..., None]
    return mask, rows.transpose(1, 2).to(torch.float32)
