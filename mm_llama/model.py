"""`MMLlama`: the frozen trunk composed with its extensions. It owns the layer loop (STYLE rule 4): it iterates the
trunk's layers itself and runs each cross-attention block just before the trunk layer it is scheduled for; nothing
inside the trunk is wrapped, hooked or patched.

Text-only input skips the cross-attention blocks entirely, so its logits are bit-identical to the trunk's.

Shapes: B batch, T text positions, N vision tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters.cross_attention import CrossAttentionConfig, ImageAdapter, cross_attention_mask
from adapters.media_tokens import MediaTokenEmbedding
from mm_llama.errors import InputError
from mm_llama.llama import KVCacheLike, Llama
from mm_llama.transfer import to_device

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class VisionInputs:
    """The images of a batch, already encoded and projected to the trunk's width."""

    tokens: torch.Tensor  # (B, N, D), N = image slots x tiles x tokens_per_tile
    tile_mask: torch.Tensor  # (B, I, Tiles) bool on the CPU, True for real tiles of real images
    n_images: list[int]  # images per sample (the rest of the I slots are padding)
    tokens_per_tile: int


class MMLlama(nn.Module):
    """Trunk + media-token rows + (optionally) an image encoder, its projection and the image adapter.

    Args:
        trunk: the Llama 3 trunk (frozen in every stage but `lm`).
        vision: the tiled ViT (`encoders.vision.VisionEncoder`), or None.
        image_adapter: gated cross-attention blocks, or None for a text-only model.
    """

    def __init__(self, trunk: Llama, *, vision: nn.Module | None = None, image_adapter: ImageAdapter | None = None):
        super().__init__()
        self.trunk = trunk
        self.media = MediaTokenEmbedding(trunk.config.dim, trunk.config.vocab_size)
        self.vision = vision
        # Multi-layer ViT features (7680-d for ViT-H) -> the trunk's width, with a bias (Llama 3.2's projection).
        self.vision_projection = nn.Linear(vision.config.output_dim, trunk.config.dim) if vision is not None else None
        self.image_adapter = image_adapter
        self.image_id = trunk.config.vocab_size  # <|image|>: the first media row (128256 for Llama 3)
        # HF transformers' reading of a padding image (tile 0 real in the encoder's mask); it only matters with
        # hf_compat rows, where text without an image attends to every vision token, padding included.
        self.hf_padding_images = False
        self.tokenizer = None  # set by from_pretrained when the directory has a tokenizer.model
        self.max_images = 8  # images per question (bounds the cross-attention memory)

    @classmethod
    def from_pretrained(cls, path, *, hf_compat: bool = False, dtype: torch.dtype | None = torch.bfloat16,
                        device: torch.device | str = "cpu") -> "MMLlama":
        """Load a Llama 3.2 Vision checkpoint directory, strictly: Hugging Face Mllama (config.json), Meta
        (params.json with vision fields + consolidated.NN.pth) or mm-llama (mm_llama.json with a vision part).

        Args:
            hf_compat: reproduce transformers >= 4.56 exactly (intermediate ViT features taken after block i; the
                cross-attention branch not row-masked; HF's padding-image tile). Default: Meta's reference
                semantics, which the checkpoints were trained with.
            dtype: parameter dtype (None keeps the checkpoint's); device: where the weights go.
        """
        from mm_llama.checkpoints.mllama import load_mmllama

        return load_mmllama(path, hf_compat=hf_compat, dtype=dtype, device=device)

    def ask(self, question: str, **kwargs) -> str:
        """Answer `question` (optionally about `image=` or `images=`); see `mm_llama.api.ask_stream`."""
        from mm_llama.api import ask

        return ask(self, question, **kwargs)

    def ask_stream(self, question: str, **kwargs):
        """Stream the answer to `question` as text pieces; see `mm_llama.api.ask_stream`."""
        from mm_llama.api import ask_stream

        return ask_stream(self, question, **kwargs)

    @classmethod
    def with_image_adapter(cls, trunk: Llama, config: CrossAttentionConfig, vision: nn.Module | None = None
                           ) -> "MMLlama":
        return cls(trunk, vision=vision, image_adapter=ImageAdapter(trunk.config, config))

    def preprocess(self, images: list[list], device: torch.device | str | None = None) -> dict:
        """Raw images per sample -> the tiled, normalised batch `forward(images=...)` takes."""
        from encoders.image_transform import ImageTransform, ImageTransformConfig, collate_images

        if self.vision is None:
            raise InputError("this model has no image encoder")
        if any(len(sample) > self.max_images for sample in images):
            raise InputError(f"a sample has more than {self.max_images} images, the most this model accepts")
        c = self.vision.config
        transform = ImageTransform(ImageTransformConfig(tile_size=c.tile_size, max_tiles=c.max_tiles))
        batch = collate_images([[transform(image) for image in sample] for sample in images])
        weight = self.vision_projection.weight
        device = weight.device if device is None else device
        return {"pixel_values": batch["pixel_values"].to(device, weight.dtype),
                "aspect_ratio_ids": batch["aspect_ratio_ids"].to(device), "n_images": batch["n_images"].tolist()}

    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      n_images: list[int], encoder=None) -> VisionInputs:
        """Tiled images (B, I, Tiles, 3, S, S) with their ratio ids (B, I) -> projected vision tokens and masks.
        `encoder`: a stand-in for `self.vision` with the same signature (e.g. a compiled one, see generate.py)."""
        from encoders.vision import tile_mask_from_ids

        if self.vision is None:
            raise InputError("this model has no image encoder")
        # Tile masks are made on the host, before any of this request's work is queued: the masks of the text
        # (`cross_inputs`) then need no wait for the encoder.
        ids = aspect_ratio_ids.cpu()
        tile_mask = tile_mask_from_ids(ids, pixel_values.shape[2])  # (B, I, Tiles)
        encoder_mask = tile_mask.clone()
        if self.hf_padding_images:
            encoder_mask[..., 0] |= ids == 0
        encoder = self.vision if encoder is None else encoder
        features = encoder(pixel_values, aspect_ratio_ids, to_device(encoder_mask, pixel_values.device))
        B, n_slots, n_tiles, L, _ = features.shape
        tokens = self.vision_projection(features).reshape(B, n_slots * n_tiles * L, -1)  # (B, N, D)
        return VisionInputs(tokens, tile_mask, list(n_images), L)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, media ids included -> (B, T, D). (Ids are checked by the callers that take user input, so
        that this stays free of host synchronisation.)"""
        return self.media(tokens, self.trunk.tok_embeddings)

    def cross_kv(self, vision: torch.Tensor) -> CrossKV:
        """Keys/values of every cross-attention block for projected vision tokens (B, N, D): computed once per
        request and reused at every decode step."""
        if self.image_adapter is None:
            raise InputError("this model has no image adapter: it answers text only")
        return self.image_adapter.kv(vision)

    def cross_inputs(self, tokens: torch.Tensor, vision: VisionInputs) -> dict:
        """`forward`'s image arguments for `tokens` (B, T): cross-attention K/V, mask and rows. `tokens` are read
        on the host: a CPU tensor lets this queue its work behind the image encoder's without waiting for it."""
        mask, rows = cross_attention_mask(tokens, self.image_id, vision.n_images, vision.tile_mask,
                                          vision.tokens_per_tile, device=vision.tokens.device)
        return {"cross_kv": self.cross_kv(vision.tokens), "cross_mask": mask, "rows": rows.to(vision.tokens.dtype)}

    def forward(self, tokens: torch.Tensor, *, images: dict | None = None, cross_kv: CrossKV | None = None,
                cross_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCacheLike | None = None, cache_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for `tokens` (B, T), attending to images.

        Args:
            images: the images of the batch: a list per sample of paths / PIL images / uint8 arrays, or what
                `preprocess` (`encoders.image_transform.collate_images`) returns ({"pixel_values",
                "aspect_ratio_ids", "n_images", ...}); encoded, projected and attended in this call — the path
                training takes (under FSDP every weight is then used inside this forward).
            cross_kv, cross_mask, rows: precomputed image inputs (`cross_inputs`), the path generation takes: K/V
                once per request. cross_mask None means every position sees every vision token.
            positions, mask, cache, cache_pos, last_only: as for `Llama.forward`.
            Without images or cross_kv the cross blocks are skipped (text-only: bit-identical to the trunk).
        Returns:
            (B, T, V) fp32 logits.
        """
        if cache is not None and (mask is None or cache_pos is None):
            raise ValueError("a KV cache needs an explicit mask and cache_pos (see generate.py)")
        if isinstance(images, list):  # raw images per sample (DESIGN §5): paths, PIL images, uint8 arrays
            images = self.preprocess(images, device=tokens.device)
        if images is not None:
            vision = self.encode_images(images["pixel_values"], images["aspect_ratio_ids"],
                                        [int(n) for n in images["n_images"]])
            cross_mask, rows = cross_attention_mask(tokens, self.image_id, vision.n_images, vision.tile_mask,
                                                    vision.tokens_per_tile)
            rows = rows.to(vision.tokens.dtype)
            # Each block computes its K/V from the vision tokens inside its own forward.
            cross_kv = [vision.tokens] * len(self.image_adapter.cross_attention_layers)
        if cross_kv is not None and rows is None:
            raise ValueError("cross_kv needs rows (and cross_mask, unless every vision token is visible)")
        h = self.embed(tokens)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        rope = self.trunk.rope(positions)
        before = self.image_adapter.block_before() if cross_kv is not None else {}
        for i, layer in enumerate(self.trunk.layers):
            if i in before:
                j = before[i]
                h = self.image_adapter.cross_attention_layers[j](h, cross_kv[j], cross_mask, rows)
            h = layer(h, rope, mask, cache, cache_pos)
        return self.trunk.head(h[:, -1:] if last_only else h)
