"""Stage `video-adapter` (paper §7.4-7.5, DESIGN §6): on a trained image model (trunk, ViT, image adapter, all
frozen), train only the video adapter — the temporal aggregator and the video cross-attention blocks — on clip +
description/Q&A shards. The loss is next-token cross-entropy on the answer tokens only.

    mm-llama data synth --kind video --out data/demo/video --n 20000
    mm-llama train video-adapter --config configs/demo/video_adapter.yaml [--train.steps=500 ...] [--resume]

Initialisation: the paper starts video pretraining from the image-annealed weights, the aggregator and the video
blocks new (an image model that has a video adapter already, as the embedded one, is read without it). With
`init_blocks_from_image` (default) each video block starts as a copy of the image block at the same trunk layer, its
trained gates included (`adapter.gate_init` then applies only without the copy): it already reads tokens of the image
encoder's space, in which the aggregator's effective frames start (each group's mean frame).
Checkpoints are in mm-llama's format, the trunk by reference (as the image stage's), every other part stored;
`MMLlama.from_pretrained` loads one directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from adapters.video import VideoAdapterConfig
from mm_llama.checkpoints.ours import read_ours_parts
from mm_llama.data.video import VideoDataConfig, VideoTextBatches
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.media import Media
from mm_llama.model import MMLlama
from mm_llama.paths import checkpoint_path
from mm_llama.train.base_model import BaseModel, read_base_model
from mm_llama.train.distributed import Runtime
from mm_llama.train.image_adapter import answer_targets, chat_loss, training_blocks
from mm_llama.train.loop import TrainConfig, TrainResult, run_stage


@dataclass(kw_only=True)
class VideoAdapterStageConfig:
    """The stage's YAML: `image_model`, an mm-llama checkpoint with an image adapter (a stage image-adapter
    checkpoint, or "demo"), and the video adapter to add to it."""

    image_model: str
    adapter: VideoAdapterConfig
    init_blocks_from_image: bool = True
    data: VideoDataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if self.data.n_frames != self.adapter.n_frames:
            raise ConfigError(f"data.n_frames ({self.data.n_frames}) differs from adapter.n_frames "
                              f"({self.adapter.n_frames}); every clip gives the adapter's number of frames")


class VideoAdapterStage:
    name = "video-adapter"

    def __init__(self, config: VideoAdapterStageConfig):
        self.config = config
        self.tokenizer_path = Path(config.data.tokenizer)
        self.image_model = checkpoint_path(config.image_model)
        self._model_config = None  # the built model's config, for `save`
        self._base: BaseModel | None = None  # the image model, whose parts are written with each checkpoint

    def build(self, runtime: Runtime) -> nn.Module:
        c = self.config
        self._base = read_base_model(self.image_model, f"image_model {c.image_model}", "the video stage starts from "
                                     "an mm-llama checkpoint with an image adapter: a stage image-adapter checkpoint, "
                                     "or 'demo'", trains=("video_adapter",), announce=runtime.is_main)
        base = self._base.config
        if base.image_adapter is None:
            raise ConfigError(f"image_model {c.image_model} has no image adapter: the video stage builds on a trained "
                              "image model (its ViT encodes the frames, its blocks place the video blocks)")
        v = base.vision
        if (v.tile_size, v.max_tiles) != (c.data.tile_size, c.data.max_tiles):
            raise ConfigError(f"data tiles ({c.data.tile_size} px, up to {c.data.max_tiles}) differ from the image "
                              f"model's encoder ({v.tile_size} px, up to {v.max_tiles}); make them match")
        model = self._base.build(replace(base, video_adapter=c.adapter), runtime.device, new=("video_adapter",))
        if c.init_blocks_from_image:
            _copy_image_blocks(model)
        model.requires_grad_(False)
        model.video_adapter.requires_grad_(True)
        self._model_config = model.config
        return model

    def blocks(self, model: MMLlama) -> list[nn.Module]:
        return [*training_blocks(model), *model.video_adapter.cross_attention_layers,
                *model.video_adapter.aggregator.layers]

    def checkpoint_blocks(self, model: MMLlama) -> list[nn.Module]:
        # 16-64 frames through a frozen ViT keep no activations; the aggregator's and the text side's do.
        return [*model.video_adapter.aggregator.layers, *model.trunk.layers,
                *model.image_adapter.cross_attention_layers, *model.video_adapter.cross_attention_layers]

    def batches(self, runtime: Runtime, start: int) -> Iterator[dict]:
        source = VideoTextBatches(self.config.data, rank=runtime.rank, world_size=runtime.world_size)
        for batch in source.batches(start):
            yield {**batch, "videos": batch["videos"].to(runtime.device), "tokens": batch["tokens"].to(runtime.device),
                   "labels": batch["labels"].to(runtime.device)}

    def n_targets(self, batch: dict) -> int:
        return answer_targets(batch)

    def loss(self, model: MMLlama, batch: dict) -> torch.Tensor:
        return chat_loss(model, batch, Media(videos=batch["videos"]))

    def save(self, trainable: dict[str, torch.Tensor], out: Path) -> None:
        """The trained video adapter with the image model's frozen parts (a loadable model), the trunk by
        reference, and the tokenizer."""
        self._base.save_with(out, trainable, self._model_config, self.tokenizer_path)

    def load(self, ckpt: Path) -> dict[str, torch.Tensor]:
        parts = read_ours_parts(ckpt)
        if "video_adapter" not in parts:
            raise CheckpointError(f"{ckpt}: not a video-adapter checkpoint (parts {sorted(parts)})")
        return dict(parts["video_adapter"][1])


def _copy_image_blocks(model: MMLlama) -> None:
    """Each video block from the image block at its trunk layer, gates included: the trained gates say how much
    that block adds (the demo's: tanh 0.02-0.15); a block copied with larger gates (0.5) adds its reading of the
    frames several times over, and the first steps unlearn it (issue 11's note: starting loss 4.1 against 2.0)."""
    image = dict(zip(model.image_adapter.schedule, model.image_adapter.cross_attention_layers, strict=True))
    with torch.no_grad():
        for layer, block in zip(model.video_adapter.schedule, model.video_adapter.cross_attention_layers, strict=True):
            missing, unexpected = block.load_state_dict(image[layer].state_dict(), strict=False)
            if unexpected or set(missing) - {"attention.moment_mix"}:  # a moment-reading block's mix starts at 1/E
                raise CheckpointError(f"video block before layer {layer} does not fit the image block (missing "
                                      f"{missing}, unexpected {unexpected})")


def main(config_path: str | None, overrides: Sequence[str] = (), resume: bool = False) -> TrainResult:
    return run_stage(VideoAdapterStageConfig, VideoAdapterStage, config_path, overrides, resume,
                     result_name="video-adapter checkpoint")
