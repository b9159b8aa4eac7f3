"""Stage `vision-pretrain` (paper §7.2, DESIGN §3.3 and §6): train the image encoder contrastively on image–caption
pairs, CLIP-style: our `VisionEncoder` + a small pooling head against open_clip's text tower, with open_clip's
learnable temperature and `ClipLoss`. Everything trains.

    mm-llama data synth --kind image --out data/demo/image --n 20000
    mm-llama train vision-pretrain --config configs/demo/vision_pretrain.yaml [--train.steps=500 ...] [--resume]

Each checkpoint directory is in mm-llama's format with no trunk and two parts: "vision" (`vision.*`, the
`VisionEncoder` state, with its `VisionConfig`: the same part the image-adapter stage writes) and "clip_heads"
(`image_head.*` and the open_clip text tower `clip.*`, incl. `clip.logit_scale`), so a later stage can start its ViT
from the "vision" part (`image-adapter`'s `init_vision`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.vision import VisionConfig, VisionEncoder
from mm_llama.checkpoints.ours import read_ours_parts, write_ours
from mm_llama.data.image import ImageDataConfig
from mm_llama.data.image_text import ImageCaptionBatches
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.model import stored_part_config
from mm_llama.train.distributed import Runtime
from mm_llama.train.loop import TrainConfig, TrainResult, run_stage

MAX_LOGIT_SCALE = math.log(100)  # open_clip's training script clamps the learnt temperature to 1/100


@dataclass(kw_only=True)
class VisionPretrainStageConfig:
    """The stage's YAML.

    Args:
        vision: the ViT (a preset allowed; the paper trains at 224 px, one tile: `{preset: paper, max_tiles: 1}`).
        text_model: the open_clip model whose text tower and tokenizer are used (its image tower is not built into
            the trained model).
        text_pretrained: an open_clip pretrained tag for that text tower (downloads; fails if it cannot load), or
            null for an explicitly random tower.
        text_cfg: overrides of the open_clip model's `text_cfg` (e.g. a tiny tower for tests); only with a random
            tower, since pretrained weights would not fit.
        embed_dim: joint embedding size; default: the open_clip model's.
        init_from_open_clip, init_pretrained: start the ViT's local layers from this open_clip model's visual tower
            with this pretrained tag (`VisionEncoder.from_open_clip`); the resulting config must equal `vision`.
    """

    vision: VisionConfig
    text_model: str = "ViT-H-14"
    text_pretrained: str | None = None
    text_cfg: dict[str, Any] | None = None
    embed_dim: int | None = None
    init_from_open_clip: str | None = None
    init_pretrained: str | None = None
    data: ImageDataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        v, d = self.vision, self.data
        if (v.tile_size, v.max_tiles) != (d.tile_size, d.max_tiles):
            raise ConfigError(f"data tiles ({d.tile_size} px, up to {d.max_tiles}) differ from the vision encoder's "
                              f"({v.tile_size} px, up to {v.max_tiles}); make data.tile_size and data.max_tiles match")
        if self.text_pretrained is not None and self.text_cfg:
            raise ConfigError(f"text_cfg overrides {sorted(self.text_cfg)} cannot be combined with text_pretrained "
                              f"{self.text_pretrained!r}: the pretrained weights would not fit")
        if (self.init_from_open_clip is None) != (self.init_pretrained is None):
            raise ConfigError("give both init_from_open_clip (an open_clip model name) and init_pretrained (its "
                              f"pretrained tag) or neither, got {self.init_from_open_clip!r}, {self.init_pretrained!r}")


class ImageHead(nn.Module):
    """CLS token of the global transformer's output → LayerNorm → Linear into the joint embedding (no bias, as
    CLIP's `proj`)."""

    def __init__(self, width: int, embed_dim: int, eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cls = features[:, 0, 0, 0, : self.width]  # (B, D): image 0, tile 0, token 0; the first D = final features
        return self.proj(self.norm(cls))  # (B, E)


class ContrastiveModel(nn.Module):
    """ViT + image head, and an open_clip model used for its text tower and `logit_scale` only."""

    def __init__(self, vision: VisionEncoder, image_head: ImageHead, clip: nn.Module):
        super().__init__()
        self.vision, self.image_head, self.clip = vision, image_head, clip

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns L2-normalised image (B, E) and text (B, E) embeddings and the clamped temperature exp(s)."""
        image = F.normalize(self.image_head(self.vision(pixel_values, aspect_ratio_ids)), dim=-1)
        text = self.clip.encode_text(text, normalize=True)
        return image, text, self.clip.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp().squeeze()  # () from (1,)


def _open_clip_text(c: VisionPretrainStageConfig) -> nn.Module:
    import open_clip

    base = open_clip.get_model_config(c.text_model)
    if base is None:
        raise ConfigError(f"text_model {c.text_model!r} is not an open_clip model; known: {open_clip.list_models()}")
    kwargs: dict[str, Any] = {}
    if c.text_cfg:
        kwargs["text_cfg"] = {**base["text_cfg"], **c.text_cfg}
    if c.embed_dim is not None and c.embed_dim != base["embed_dim"]:
        if c.text_pretrained is not None:
            raise ConfigError(f"embed_dim {c.embed_dim} differs from {c.text_model}'s {base['embed_dim']}, which "
                              f"its pretrained text projection ({c.text_pretrained!r}) fixes")
        kwargs["embed_dim"] = c.embed_dim
    # logit_scale of shape (1,): FSDP2 cannot shard a 0-dim parameter (open_clip reshapes a checkpoint's on load).
    clip = open_clip.create_model(c.text_model, pretrained=c.text_pretrained, nonscalar_logit_scale=True,
                                  require_pretrained=c.text_pretrained is not None, **kwargs)
    # Only the text tower (and logit_scale) train here: drop the image tower so it is neither stored nor updated.
    clip.visual = None
    return clip


class VisionPretrainStage:
    name = "vision-pretrain"

    def __init__(self, config: VisionPretrainStageConfig):
        import open_clip

        self.config = config
        self.tokenizer = open_clip.get_tokenizer(config.text_model, context_length=self._context_length())
        self._loss = None

    def _context_length(self) -> int:
        import open_clip

        base = open_clip.get_model_config(self.config.text_model) or {}
        return {**base.get("text_cfg", {}), **(self.config.text_cfg or {})}.get("context_length", 77)

    def build(self, runtime: Runtime) -> nn.Module:
        from open_clip.loss import ClipLoss

        c = self.config
        clip = _open_clip_text(c)
        if c.init_from_open_clip is not None:
            v = c.vision
            vision = VisionEncoder.from_open_clip(
                c.init_from_open_clip, c.init_pretrained, n_global_layers=v.n_global_layers, max_tiles=v.max_tiles,
                tile_size=v.tile_size, intermediate_layers=v.intermediate_layers,
                intermediate_mode=v.intermediate_mode, pad_to_multiple=v.pad_to_multiple)
            if differ := {k: (a, vision.config.to_dict()[k]) for k, a in v.to_dict().items()
                          if vision.config.to_dict()[k] != a}:
                raise ConfigError(f"vision config differs from {c.init_from_open_clip}'s tower (ours, its): {differ}")
        else:
            vision = VisionEncoder(c.vision)
        head = ImageHead(c.vision.width, c.embed_dim or clip.text_projection.shape[-1], c.vision.norm_eps)
        # Several ranks: each rank's rows against all ranks' columns, gradients through the gather (open_clip's
        # --local-loss --gather-with-grad); the loop's rank-mean of the local means is the global mean.
        many = runtime.world_size > 1
        self._loss = ClipLoss(local_loss=many, gather_with_grad=many, rank=runtime.rank,
                              world_size=runtime.world_size)
        return ContrastiveModel(vision, head, clip).to(runtime.device)

    def blocks(self, model: ContrastiveModel) -> list[nn.Module]:
        text = getattr(model.clip, "text", model.clip)  # CustomTextCLIP keeps its tower in `.text`
        text_blocks = list(getattr(getattr(text, "transformer", None), "resblocks", []))
        return [*model.vision.transformer.resblocks, *model.vision.global_transformer.resblocks, *text_blocks]

    def batches(self, runtime: Runtime, start: int) -> Iterator[dict]:
        source = ImageCaptionBatches(self.config.data, rank=runtime.rank, world_size=runtime.world_size)
        for batch in source.batches(start):
            yield {**batch, "images": batch["images"].to(runtime.device),
                   "text": self.tokenizer(batch["captions"]).to(runtime.device)}  # (B, context_length)

    def n_targets(self, batch: dict) -> int:
        return len(batch["captions"])

    def loss(self, model: ContrastiveModel, batch: dict) -> torch.Tensor:
        images = batch["images"]
        image, text, scale = model(images.pixel_values, images.aspect_ratio_ids, batch["text"])
        # ClipLoss is a mean over the batch (both directions averaged); the loop wants a sum over the targets.
        return self._loss(image.float(), text.float(), scale.float()) * len(batch["captions"])

    def save(self, trainable: dict[str, torch.Tensor], out: Path) -> None:
        c = self.config
        vision = {k: v for k, v in trainable.items() if k.startswith("vision.")}
        heads = {k: v for k, v in trainable.items() if k.startswith(("image_head.", "clip."))}
        if rest := sorted(trainable.keys() - vision.keys() - heads.keys()):
            raise CheckpointError(f"tensors {rest[:5]} belong to no part of the vision-pretrain checkpoint")
        # The same "vision" part the image-adapter stage writes (semantics fields are chosen when loading).
        vision_config = stored_part_config("vision", c.vision)
        heads_config = {"text_model": c.text_model, "text_cfg": c.text_cfg or {},
                        "embed_dim": int(heads["image_head.proj.weight"].shape[0])}
        write_ours(out, trunk={}, parts={"vision": (vision_config, vision), "clip_heads": (heads_config, heads)})

    def load(self, ckpt: Path) -> dict[str, torch.Tensor]:
        parts = read_ours_parts(ckpt)
        if not {"vision", "clip_heads"} <= parts.keys():
            raise CheckpointError(f"{ckpt}: not a vision-pretrain checkpoint (parts {sorted(parts)})")
        return {**parts["vision"][1], **parts["clip_heads"][1]}


def main(config_path: str | None, overrides: Sequence[str] = (), resume: bool = False) -> TrainResult:
    return run_stage(VisionPretrainStageConfig, VisionPretrainStage, config_path, overrides, resume,
                     result_name="vision-pretrain checkpoint")
