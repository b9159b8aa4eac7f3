"""The image medium between the image encoder and its gated cross-attention adapter (paper §7.2, Llama 3.2 Vision):
tiled images (`encoders.image_transform.Images`) -> ViT features -> projection to the trunk's width -> the adapter's
`CrossAttentionInputs` (keys/values or the tokens they come from, and the masks of the text that follows each
`<|image|>`).

Tile masks are on the host before any of a request's work is queued, so the masks of the text need no wait for the
encoder: the host queues the encoder, the keys/values and the prefill back to back.

Shapes: B batch, I image slots per sample, Tiles tile slots per image, L tokens per tile, F encoder features,
D model dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapters.cross_attention import CrossAttentionInputs, GatedCrossAttention, cross_attention_inputs
from encoders.image_transform import Images
from encoders.vision import VisionConfig
from encoders.vision_blocks import cached_constant, patch_position_table
from mm_llama.transfer import to_device


class VisionProjection(nn.Linear):
    """The ViT's features (F) -> image tokens at the trunk's width (D): Llama 3.2's `vision_projection` (a linear map
    with a bias), and with `VisionConfig.patch_position_features` a fixed 2-D sin-cos position of each patch added,
    as loud as the token (its RMS, not differentiated) times a learned scale starting at 1 (`position_scale`).

    Why (issue 10): cross-attention puts no position on image keys or values. A ViT trained from scratch in the image
    stage loses where each patch is: a patch's feature names its place 98 % of the time at random init, 54 % after
    the stage, and the shapes world's position answers stay at chance. With the position added here, the same adapter
    learns them: 17 % -> 55 % in 900 CPU steps on position questions, against 17 % -> 8 % without. The table is
    made by the forward (no buffer, so a model built on the meta device needs nothing filled in), once per device and
    dtype (`cached_constant`).
    """

    def __init__(self, vision: VisionConfig, dim: int):
        super().__init__(vision.output_dim, dim)
        self.side = vision.n_patches_per_side if vision.patch_position_features else None
        if self.side is not None:
            self.position_scale = nn.Parameter(torch.ones(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (..., L, F) with L = 1 + patches per tile (class token first) -> (..., L, D)."""
        tokens = super().forward(features)
        if self.side is None:
            return tokens
        side, dim, device, dtype = self.side, tokens.shape[-1], tokens.device, tokens.dtype
        table = cached_constant(("patch_position_table", side, dim, device, dtype),
                                lambda: patch_position_table(side, dim, device=device, dtype=dtype))  # (L, D)
        loudness = tokens.detach().pow(2).mean(-1, keepdim=True).sqrt()  # per token: batch-independent
        return tokens + self.position_scale.to(tokens.dtype) * loudness * table


def encode_images(images: Images, encoder: nn.Module, projection: nn.Module, *, hf_padding_images: bool
                  ) -> torch.Tensor:
    """Tiled images -> projected image tokens (B, I * Tiles * L, D).

    Args:
        encoder: the ViT (`encoders.vision.VisionEncoder`, or a compiled stand-in with its signature).
        projection: features F -> the trunk's width D (Llama 3.2's `vision_projection`).
        hf_padding_images: transformers' reading of a padding image slot (its tile 0 real in the encoder's mask);
            it only changes anything with HF's row semantics, where text without an image sees every image token.
    """
    encoder_mask = images.tile_mask.clone()  # (B, I, Tiles), on the host
    if hf_padding_images:
        padding = torch.arange(encoder_mask.shape[1])[None, :] >= torch.tensor(images.n_images)[:, None]  # (B, I)
        encoder_mask[..., 0] |= padding
    pixels = images.pixel_values.to(projection.weight.dtype)  # normalised in fp32, encoded in the model's dtype
    features = encoder(pixels, images.aspect_ratio_ids, to_device(encoder_mask, pixels.device))  # (B, I, T, L, F)
    B, n_slots, n_tiles, L, _ = features.shape
    return projection(features).reshape(B, n_slots * n_tiles * L, -1)  # (B, N, D)


def image_inputs(tokens: Sequence[Sequence[int]], images: Images, projected: torch.Tensor, *, image_id: int,
                 adapter: GatedCrossAttention | None = None) -> CrossAttentionInputs:
    """The image adapter's inputs for the text `tokens` (B rows of ids, read on the host).

    Args:
        projected: `encode_images`' output (B, N, D).
        image_id: the `<|image|>` id; each sample needs one per image, where the text it covers starts.
        adapter: given, the keys/values of every block are computed here, once (generation); None, each block
            computes its own from `projected` inside its forward (training).
    """
    tokens_per_tile = projected.shape[1] // (images.tile_mask.shape[1] * images.tile_mask.shape[2])
    kv = adapter.kv(projected) if adapter is not None else None
    return cross_attention_inputs(tokens, image_id, images.n_images, images.tile_mask, tokens_per_tile,
                                  source=projected if kv is None else None, kv=kv)
