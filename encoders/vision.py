"""The image encoder: a ViT-H/14 with multi-layer features and gated global layers (Llama 3 §7.2, Llama 3.2 Vision).

Parameter names follow Meta's reference `VisionEncoder` (llama-models `models/llama3/multimodal/model.py`), so the
`vision_model.vision_encoder.*` part of a Meta `consolidated.00.pth` loads with no key map. The three tile embeddings
(`TILE_TABLE_KEYS`) are held as Hugging Face does, one row per aspect-ratio id ([R + 1, T, n, D]), not as Meta's
[T, T, n, D] grid: every HF checkpoint, including ones fine-tuned in transformers whose ratios no longer agree on
shared tiles, is held losslessly, and Meta's grids convert with `grid_to_table` / `table_to_grid`
(`encoders/vision_blocks.py`). `vision_hf.py` converts Hugging Face Mllama weights. `from_open_clip` copies an
open_clip visual tower into the local layers, e.g. the paper's MetaCLIP-style ViT-H/14.

Pipeline per image (all tiles of one image are attended jointly):
patchify -> + gated pre-tile embedding -> [CLS] -> (1 - tanh g) pos + tanh g tile_pos[ratio] -> ln_pre -> pad tokens
per tile to a multiple of 8 -> local transformer (intermediate features recorded) -> ln_post -> + gated post-tile
embedding -> gated global transformer -> unpad -> cat(final, interleaved intermediates).

Shape legend: B batch, I images per sample, T tile slots (`max_tiles`), S tile side in pixels, P patches per tile,
L tokens per tile (P + 1 CLS), Lp padded tokens per tile, D width, K number of intermediate layers,
F = D * (1 + K) output features, R = len(supported_aspect_ratios(T)) aspect ratios (ids 1..R; 0 = padding image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from encoders.image_transform import supported_aspect_ratios
from encoders.vision_blocks import (
    ImageTransformer,
    PadTokens,
    PatchEmbedding,
    TilePositionEmbedding,
    encoder_attention_mask,
    grid_to_table,
)
from mm_llama.errors import ConfigError, InputError

# The per-aspect-ratio tables [R + 1, T, n, D] (n = L for the first, 1 for the others); Meta stores each as a grid.
TILE_TABLE_KEYS = ("gated_positional_embedding", "pre_tile_pos_embed.embedding", "post_tile_pos_embed.embedding")


@dataclass
class VisionConfig:
    """Architecture of the image encoder. Defaults: Llama 3.2 Vision's encoder at 560-px tiles."""

    width: int = 1280
    n_layers: int = 32  # local (ungated) blocks
    n_global_layers: int = 8  # gated blocks added after contrastive pre-training
    n_heads: int = 16
    mlp_dim: int = 5120
    patch_size: int = 14
    tile_size: int = 560
    max_tiles: int = 4
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    norm_eps: float = 1e-5
    attn_bias: bool = False  # open_clip towers have q/k/v/o biases; Meta's encoder has none
    pad_to_multiple: int = 8  # Meta pads the tokens of each tile to a multiple of 8; 0 = no padding
    # "input": feature i is the INPUT of block i (Meta's reference, what the checkpoints were trained with);
    # "output": the OUTPUT of block i (Hugging Face transformers >= 4.56, one block later).
    intermediate_mode: Literal["input", "output"] = "input"
    # transformers treats tile 0 of a padding image slot as real in the encoder's mask (`MMLlama` builds that mask;
    # with HF's row semantics, text without an image sees every image token, so it changes the logits there).
    hf_padding_images: bool = False
    # Not part of Llama 3.2: the image tokens the adapters read (the projected features) get a fixed 2-D position of
    # their patch added (`adapters.image.VisionProjection`). Cross-attention puts no position on image keys or values,
    # so "where" reaches the text only through what the ViT's features keep, and a ViT trained from scratch by the
    # image stage loses it (issue 10). A pretrained ViT (CLIP) keeps it: off by default, and checkpoints with it have
    # no Meta or Hugging Face equivalent.
    patch_position_features: bool = False

    def __post_init__(self) -> None:
        self.intermediate_layers = tuple(self.intermediate_layers)
        problems = []
        for name in ("width", "n_layers", "n_heads", "mlp_dim", "patch_size", "tile_size", "max_tiles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_global_layers", "pad_to_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.norm_eps, float | int) or self.norm_eps <= 0:
            problems.append(f"norm_eps must be positive, got {self.norm_eps!r}")
        for name in ("attn_bias", "hf_padding_images", "patch_position_features"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.intermediate_mode not in ("input", "output"):
            problems.append(f"intermediate_mode must be 'input' (Meta) or 'output' (HF >= 4.56), "
                            f"got {self.intermediate_mode!r}")
        if not problems:
            if self.width % self.n_heads:
                problems.append(f"width {self.width} is not divisible by n_heads {self.n_heads}")
            if self.tile_size % self.patch_size:
                problems.append(f"tile_size {self.tile_size} is not a multiple of patch_size {self.patch_size}")
            layers = self.intermediate_layers
            if (any(not isinstance(i, int) or isinstance(i, bool) for i in layers)
                    or list(layers) != sorted(set(layers)) or any(not 0 <= i < self.n_layers for i in layers)):
                problems.append(f"intermediate_layers must be strictly increasing block indices in "
                                f"[0, n_layers={self.n_layers}), got {layers!r}")
        if problems:
            raise ConfigError("invalid VisionConfig: " + "; ".join(problems))

    @property
    def n_patches_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Patches + 1 class token (1601 at 560 px, 1025 at 448 px)."""
        return self.n_patches_per_side**2 + 1

    @property
    def padded_tokens_per_tile(self) -> int:
        m = self.pad_to_multiple
        return self.tokens_per_tile if m == 0 else -(-self.tokens_per_tile // m) * m

    @property
    def output_dim(self) -> int:
        """Features per token: final width + one width per intermediate layer (7680 for Llama 3.2)."""
        return self.width * (1 + len(self.intermediate_layers))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> VisionConfig:
        """Build from a dict, rejecting keys this class does not know (naming them, the source and the known keys)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown VisionConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> VisionConfig:
        """One of `VISION_PRESETS` ("3.2-11B", "paper", "openclip-vit-h-14", "debug"), with fields overridden."""
        if name not in VISION_PRESETS:
            raise ConfigError(f"unknown vision preset {name!r}; known presets: {sorted(VISION_PRESETS)}")
        return cls.from_dict({**VISION_PRESETS[name], **overrides}, source=f"preset {name!r}")


VISION_PRESETS: dict[str, dict] = {
    # Llama 3.2 11B/90B Vision: constants of Meta's `CrossAttentionTransformerVision` (width 1280, 32 + 8 layers,
    # 16 heads, mlp 4 x 1280, patch 14, max 4 tiles, return_intermediate "3,7,15,23,30"); tile = params.json
    # `vision_chunk_size`: 560 for the instruct/90B models, 448 for the 11B base (override `tile_size=448`).
    "3.2-11B": dict(width=1280, n_layers=32, n_global_layers=8, n_heads=16, mlp_dim=5120, patch_size=14,
                    tile_size=560, max_tiles=4, intermediate_layers=(3, 7, 15, 23, 30), pad_to_multiple=8),
    # Llama 3 paper §7.2: ViT-H/14 trained at 224 px (16 x 16 patches), 32 layers + 8 gated layers (40 blocks),
    # features of layers 4, 8, 16, 24, 31 (1-based) = indices 3, 7, 15, 23, 30 with Meta's "input of block" rule;
    # 6 x 1280 = 7680 features. §7.4 trains the adapter on up to four 336-px tiles (override `tile_size=336`).
    "paper": dict(width=1280, n_layers=32, n_global_layers=8, n_heads=16, mlp_dim=5120, patch_size=14,
                  tile_size=224, max_tiles=4, intermediate_layers=(3, 7, 15, 23, 30), pad_to_multiple=8),
    # open_clip "ViT-H-14" visual tower (model_configs/ViT-H-14.json: width 1280, 32 layers, head width 80, patch 14,
    # image 224, exact GELU, q/k/v/o biases). The 8 gated global layers start at zero gates (identity), one tile,
    # no token padding, so features equal open_clip's own.
    "openclip-vit-h-14": dict(width=1280, n_layers=32, n_global_layers=8, n_heads=16, mlp_dim=5120, patch_size=14,
                              tile_size=224, max_tiles=1, intermediate_layers=(3, 7, 15, 23, 30), attn_bias=True,
                              pad_to_multiple=0),
    # Tiny, for tests: 2 x 2 patches per tile (5 tokens, padded to 8), 4 tiles.
    "debug": dict(width=32, n_layers=4, n_global_layers=2, n_heads=4, mlp_dim=64, patch_size=14, tile_size=28,
                  max_tiles=4, intermediate_layers=(1, 3)),
}


def tile_mask_from_ids(aspect_ratio_ids: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """Which tile slots hold real tiles, as implied by the aspect-ratio ids.

    Args:
        aspect_ratio_ids: (...) long, 0 = padding image, k = ratio k-1 of `supported_aspect_ratios(max_tiles)`.
        max_tiles: tile slots per image.

    Returns:
        (..., max_tiles) bool: slot t is real iff t < h * w of the image's ratio (all False for padding images).
    """
    n_tiles = torch.tensor([0] + [h * w for h, w in supported_aspect_ratios(max_tiles)],
                           device=aspect_ratio_ids.device)
    return torch.arange(max_tiles, device=aspect_ratio_ids.device) < n_tiles[aspect_ratio_ids][..., None]


class VisionEncoder(nn.Module):
    """Tiled ViT with multi-layer features and gated global layers (Meta's Llama 3.2 `VisionEncoder` layout, the tile
    embeddings as HF's per-aspect-ratio tables)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = c = config
        d, n, m = c.width, c.tokens_per_tile, c.max_tiles
        self.conv1 = PatchEmbedding(d, c.patch_size)
        scale = d**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding = nn.Parameter(scale * torch.randn(n, d))
        # A random grid expanded to the table (row 0 and empty slots zero): grid-consistent, writable in Meta's format.
        self.gated_positional_embedding = nn.Parameter(grid_to_table(scale * torch.randn(m, m, n, d)))  # [R+1, T, L, D]
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.ln_pre = nn.LayerNorm(d, eps=c.norm_eps)
        self.ln_post = nn.LayerNorm(d, eps=c.norm_eps)
        self.pre_tile_pos_embed = TilePositionEmbedding(d, m)
        self.post_tile_pos_embed = TilePositionEmbedding(d, m)
        self.pre_tile_pos_embed.reset_parameters()
        self.post_tile_pos_embed.reset_parameters()
        block = dict(width=d, n_heads=c.n_heads, mlp_dim=c.mlp_dim, norm_eps=c.norm_eps, attn_bias=c.attn_bias)
        self.transformer = ImageTransformer(c.n_layers, gated=False, **block)
        self.global_transformer = ImageTransformer(c.n_global_layers, gated=True, **block)

    def _check_inputs(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> None:
        c = self.config
        expected = (c.max_tiles, 3, c.tile_size, c.tile_size)
        if pixel_values.ndim != 6 or tuple(pixel_values.shape[2:]) != expected:
            raise InputError(f"pixel_values must have shape (B, I, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixel_values.shape)}")
        if aspect_ratio_ids.shape != pixel_values.shape[:2] or aspect_ratio_ids.dtype != torch.long:
            raise InputError(f"aspect_ratio_ids must be a long tensor of shape {tuple(pixel_values.shape[:2])}, "
                             f"got {aspect_ratio_ids.dtype} {tuple(aspect_ratio_ids.shape)}")
        n_ratios = len(supported_aspect_ratios(c.max_tiles))
        if aspect_ratio_ids.numel():
            low, high = torch.stack(torch.aminmax(aspect_ratio_ids)).tolist()  # one reduction, one wait for the GPU
            if not 0 <= low <= high <= n_ratios:
                raise InputError(f"aspect_ratio_ids must be in [0, {n_ratios}] (0 = padding image), "
                                 f"got values in [{low}, {high}]")

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                tile_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode a batch of tiled images.

        Args:
            pixel_values: (B, I, T, 3, S, S) float, normalised tiles; empty tile slots and padding images are zeros.
                Images may have different tile counts: the real tiles of each image follow from its ratio id.
            aspect_ratio_ids: (B, I) long; 0 = padding image, k = ratio k-1 of `supported_aspect_ratios(T)`.
            tile_mask: (B, I, T) bool, the tiles treated as real by the attention mask; default: implied by the
                ids. (HF transformers treats tile 0 of a padding image as real; `MMLlama` passes that in HF mode.)

        Returns:
            (B, I, T, L, F) features: `[..., :D]` is the global transformer's output, `[..., D:]` the intermediate
            features interleaved as in Meta's reference (channel D + d*K + k holds intermediate k's channel d).
            Features of empty tile slots and padding images are computed but meaningless.
        """
        if not torch.compiler.is_compiling():  # the checks read values on the host: outside compiled graphs
            self._check_inputs(pixel_values, aspect_ratio_ids)
        c = self.config
        b, i, t, _, s, _ = pixel_values.shape
        n, n_pad, d = c.tokens_per_tile, c.padded_tokens_per_tile, c.width
        ar = aspect_ratio_ids.reshape(b * i)  # (N,) with N = B*I
        real = tile_mask_from_ids(ar, t) if tile_mask is None else tile_mask.reshape(b * i, t)
        # Read on the host before any work is queued (under torch.compile: a graph break before the first kernel).
        all_real = bool(real.all())

        x = self.conv1(pixel_values.reshape(b * i * t, 3, s, s))  # (N*T, P, D)
        x = x.view(b * i, t, n - 1, d)  # (N, T, P, D)
        x = self.pre_tile_pos_embed(x, ar)
        cls = self.class_embedding.to(x.dtype).expand(b * i, t, 1, d)
        x = torch.cat([cls, x], dim=2)  # (N, T, L, D)
        gate = self.gated_positional_embedding_gate.tanh()
        # Every slot of the image's row, empty slots and row 0 (padding images) included, as HF reads its table.
        tile_pos = self.gated_positional_embedding[ar]  # (N, T, L, D)
        x = x + (1 - gate) * self.positional_embedding + gate * tile_pos
        x = self.ln_pre(x)

        x = F.pad(x, (0, 0, 0, n_pad - n))  # (N, T, Lp, D), zero pad tokens after ln_pre as in Meta's code
        if all_real:  # only pad tokens are void: unmasked attention + pad rows fixed (same result, fused kernels)
            mask = PadTokens.layout(t, n, n_pad, x.device)
        else:
            mask = encoder_attention_mask(real, n, n_pad, x.dtype)  # (N, 1, T*Lp, T*Lp)
        x = x.view(b * i, t * n_pad, d)  # (N, T*Lp, D): all tiles of an image attend jointly
        x, features = self.transformer(x, mask, c.intermediate_layers, c.intermediate_mode)
        x = self.ln_post(x)
        x = self.post_tile_pos_embed(x.view(b * i, t, n_pad, d), ar)  # (N, T, Lp, D)
        x, _ = self.global_transformer(x.view(b * i, t * n_pad, d), mask)  # (N, T*Lp, D)

        x = x.view(b * i, t, n_pad, d)[:, :, :n]  # (N, T, L, D)
        if features:
            inter = torch.stack(features, dim=-1)  # (N, T*Lp, D, K)
            inter = inter.view(b * i, t, n_pad, d * len(features))[:, :, :n]  # (N, T, L, D*K), interleaved
            x = torch.cat([x, inter], dim=-1)  # (N, T, L, F)
        return x.reshape(b, i, t, n, c.output_dim)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None, *, n_global_layers: int = 8,
                       max_tiles: int = 1, tile_size: int | None = None,
                       intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30),
                       intermediate_mode: Literal["input", "output"] = "input",
                       pad_to_multiple: int = 0, **open_clip_kwargs) -> VisionEncoder:
        """An encoder whose local layers are an open_clip visual tower (e.g. "ViT-H-14").

        Args:
            model_name: open_clip model name.
            pretrained: open_clip pretrained tag (downloads weights), or None for an explicitly random tower.
            n_global_layers: gated global layers to add; they and all gates start at zero (identity).
            max_tiles, tile_size: tiling (tile_size defaults to the tower's image size; a different size needs
                interpolated position embeddings, which is not done here).
            intermediate_layers, intermediate_mode, pad_to_multiple: as in `VisionConfig`. With pad_to_multiple 0,
                one tile and zero gates the features equal open_clip's own (tokens after ln_post, intermediates).
            open_clip_kwargs: passed to `open_clip.create_model`.

        Returns:
            The encoder. open_clip's final `proj` (into the joint image-text space) is not part of it; the
            contrastive stage keeps using the open_clip model for that.

        Raises:
            ConfigError: the tower uses something this encoder does not have (QuickGELU, LayerScale, attention
                pooling, no ln_pre, a non-square or mismatched image size).
        """
        import open_clip  # an optional path: only this constructor needs open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained, **open_clip_kwargs)
        visual = model.visual
        _check_open_clip_tower(model_name, visual)
        blocks = visual.transformer.resblocks
        width = visual.conv1.out_channels
        image_size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        config = VisionConfig(
            width=width, n_layers=len(blocks), n_global_layers=n_global_layers, n_heads=blocks[0].attn.num_heads,
            mlp_dim=blocks[0].mlp.c_fc.out_features, patch_size=visual.conv1.kernel_size[0],
            tile_size=tile_size or image_size, max_tiles=max_tiles, intermediate_layers=intermediate_layers,
            norm_eps=visual.ln_pre.eps, attn_bias=blocks[0].attn.in_proj_bias is not None,
            pad_to_multiple=pad_to_multiple, intermediate_mode=intermediate_mode)
        if config.tokens_per_tile != visual.positional_embedding.shape[0]:
            raise ConfigError(f"tile_size {config.tile_size} gives {config.tokens_per_tile} tokens per tile but "
                              f"{model_name}'s positional embedding has {visual.positional_embedding.shape[0]} rows; "
                              f"use tile_size={image_size}")
        encoder = cls(config)
        src = visual.state_dict()
        pos = src["positional_embedding"]
        state = {
            "conv1._linear.weight": src["conv1.weight"].reshape(width, -1),
            "class_embedding": src["class_embedding"],
            "positional_embedding": pos,
            # Meta's load hook fills a missing gated grid with the local one per tile; its gate is zero anyway.
            "gated_positional_embedding": grid_to_table(pos.expand(max_tiles, max_tiles, *pos.shape)),
        }
        for norm in ("ln_pre", "ln_post"):
            for p in ("weight", "bias"):
                state[f"{norm}.{p}"] = src[f"{norm}.{p}"]
        for j in range(config.n_layers):
            pre, ours = f"transformer.resblocks.{j}.", f"transformer.resblocks.{j}."
            for name, tensor in zip(("wq", "wk", "wv"), src[pre + "attn.in_proj_weight"].chunk(3), strict=True):
                state[f"{ours}attn.{name}.weight"] = tensor
            if config.attn_bias:
                for name, tensor in zip(("wq", "wk", "wv"), src[pre + "attn.in_proj_bias"].chunk(3), strict=True):
                    state[f"{ours}attn.{name}.bias"] = tensor
                state[ours + "attn.wo.bias"] = src[pre + "attn.out_proj.bias"]
            state[ours + "attn.wo.weight"] = src[pre + "attn.out_proj.weight"]
            for name in ("mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2"):
                for p in ("weight", "bias"):
                    state[f"{ours}{name}.{p}"] = src[f"{pre}{name}.{p}"]
        # Strict, with an allow-list: only the new parts (tile embeddings, global layers, gates) keep their init.
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        new_parts = ("pre_tile_pos_embed.", "post_tile_pos_embed.", "global_transformer.",
                     "gated_positional_embedding_gate")
        bad = [k for k in missing if not k.startswith(new_parts)] + list(unexpected)
        if bad:
            raise ConfigError(f"from_open_clip({model_name!r}): keys not mapped: {bad}")
        return encoder


def _check_open_clip_tower(model_name: str, visual: nn.Module) -> None:
    """Fail loudly on open_clip towers whose computation differs from our blocks."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"visual tower is a {type(visual).__name__}, not open_clip's VisionTransformer")
    else:
        if visual.attn_pool is not None:
            problems.append("attentional pooling")
        if isinstance(visual.ln_pre, nn.Identity):
            problems.append("no ln_pre")
        for j, blk in enumerate(visual.transformer.resblocks):
            if not isinstance(blk, ResidualAttentionBlock) or not isinstance(blk.attn, nn.MultiheadAttention):
                problems.append(f"block {j} is a {type(blk).__name__}")
                break
            gelu = blk.mlp.gelu
            if not (isinstance(gelu, nn.GELU) and gelu.approximate == "none"):
                problems.append(f"block {j} activation {gelu!r} (only exact GELU is supported, not QuickGELU)")
                break
            if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
                problems.append(f"block {j} has LayerScale")
                break
    if problems:
        raise ConfigError(f"open_clip model {model_name!r} is not supported by VisionEncoder: " + "; ".join(problems))
