"""Stage `image-adapter` (paper §7.2, DESIGN §6): train the image encoder's projection, the gated cross-attention
blocks and the media-token rows (and the ViT itself, as the paper does, unless `train_vision: false`) on image +
caption/Q&A shards, with the trunk frozen. The loss is next-token cross-entropy on the answer tokens only.

    mm-llama data synth --kind image --out data/demo/image --n 20000
    mm-llama train image-adapter --config configs/demo/image_adapter.yaml [--train.steps=500 ...] [--resume]

Each checkpoint directory is in mm-llama's format: the trunk by reference (its path relative to the checkpoint, its
absolute path and the fingerprint of its weights, computed once when the stage loads it: `ours.trunk_reference`; the
trunk weights themselves for a `trunk_preset` smoke-test trunk), the model's parts ("vision", "vision_projection",
"image_adapter", "media": the frozen ViT is stored too) and the tokenizer.model. `MMLlama.from_pretrained` loads it
wherever the two run directories are moved together; `mm-llama export` writes a self-contained copy to share.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.cross_attention import CrossAttentionConfig
from encoders.vision import VisionConfig
from mm_llama.checkpoints.fingerprint import trunk_fingerprint
from mm_llama.checkpoints.ours import read_ours_parts, split_parts, trunk_reference, write_ours
from mm_llama.data.image import IGNORE, ImageDataConfig, ImageTextBatches
from mm_llama.errors import CheckpointError, ConfigError, TrainingError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.media import Media
from mm_llama.model import MMConfig, MMLlama
from mm_llama.train.distributed import Runtime
from mm_llama.train.loop import TrainConfig, TrainResult, run_stage


@dataclass(kw_only=True)
class ImageAdapterStageConfig:
    """The stage's YAML. Exactly one of `trunk` (a Meta, HF or mm-llama trunk directory, e.g. a stage-`lm`
    checkpoint) and `trunk_preset` (a randomly initialised trunk of a `LlamaConfig` preset, seeded by
    `train.seed`: only for smoke tests, it knows no language)."""

    trunk: str | None = None
    trunk_preset: str | None = None
    vision: VisionConfig
    adapter: CrossAttentionConfig
    train_vision: bool = True  # the paper updates the ViT in this stage; false freezes it
    # Start the ViT from the "vision" part of an mm-llama checkpoint (e.g. stage vision-pretrain's); null: random.
    init_vision: str | None = None
    data: ImageDataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if (self.trunk is None) == (self.trunk_preset is None):
            raise ConfigError("give exactly one of 'trunk' (a checkpoint directory) and 'trunk_preset' (smoke tests), "
                              f"got trunk={self.trunk!r}, trunk_preset={self.trunk_preset!r}")
        v, d = self.vision, self.data
        if (v.tile_size, v.max_tiles) != (d.tile_size, d.max_tiles):
            raise ConfigError(f"data tiles ({d.tile_size} px, up to {d.max_tiles}) differ from the vision encoder's "
                              f"({v.tile_size} px, up to {v.max_tiles}); make data.tile_size and data.max_tiles match")


def training_blocks(model: MMLlama) -> list[nn.Module]:
    """The units the loop shards, compiles and may checkpoint: trunk layers, cross-attention blocks, ViT blocks."""
    return [*model.trunk.layers, *model.image_adapter.cross_attention_layers,
            *model.vision.transformer.resblocks, *model.vision.global_transformer.resblocks]


def checkpointed_blocks(model: MMLlama, train_vision: bool) -> list[nn.Module]:
    """What activation checkpointing recomputes: the ViT's blocks when it trains (a batch of four 4-tile 560-px
    images is 25,728 vision tokens through 40 blocks, against 2,048 text tokens), else the text side's (a frozen ViT
    keeps no activations: nothing in it needs a gradient)."""
    if train_vision:
        return [*model.vision.transformer.resblocks, *model.vision.global_transformer.resblocks]
    return [*model.trunk.layers, *model.image_adapter.cross_attention_layers]


def answer_targets(batch: dict) -> int:
    """The answer tokens of a chat batch the loss reads (the image and video stages)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def chat_loss(model: MMLlama, batch: dict, media: Media) -> torch.Tensor:
    """Next-token cross-entropy summed over the answer tokens of a chat batch about `media` (the image and video
    stages): position t predicts token t+1."""
    tokens, labels = batch["tokens"][:, :-1], batch["labels"][:, 1:]
    # The media tokens (the vocabulary size and up) have no output row: they must never be targets.
    if int(labels.max()) >= model.trunk.config.vocab_size:
        raise TrainingError(f"labels hold id {int(labels.max())}, outside the output vocabulary")
    logits = model(tokens, media)  # (B, L-1, V) fp32
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


class ImageAdapterStage:
    name = "image-adapter"

    def __init__(self, config: ImageAdapterStageConfig):
        self.config = config
        self.tokenizer_path = Path(config.data.tokenizer)
        from mm_llama.tokenizer import Tokenizer

        self.n_words = Tokenizer.from_file(self.tokenizer_path).n_words
        self._frozen: dict[str, dict[str, torch.Tensor]] = {}  # part -> frozen weights to store with each checkpoint
        self._model_config: MMConfig | None = None  # known once built (the trunk's config comes from its checkpoint)
        self._trunk_fingerprint: str | None = None  # of the trunk checkpoint's weights, for the reference to it

    def build(self, runtime: Runtime) -> nn.Module:
        c = self.config
        if c.trunk is not None:
            trunk = Llama.from_pretrained(c.trunk, dtype=torch.float32, device=runtime.device)
            # From the loaded weights: fp32 holds the checkpoint's bf16/fp32 values exactly, so this is its fingerprint.
            self._trunk_fingerprint = trunk_fingerprint(trunk.state_dict(), tie_embeddings=trunk.config.tie_embeddings)
        else:
            with torch.device(runtime.device):
                trunk = Llama(LlamaConfig.preset(c.trunk_preset))
            trunk.init_weights()  # seeded by the loop (train.seed)
            state = trunk.state_dict()
            if trunk.config.tie_embeddings:
                state.pop("output.weight")
            self._frozen["trunk"] = {k: v.detach().cpu().clone() for k, v in state.items()}
        if trunk.config.vocab_size != self.n_words:
            raise ConfigError(f"the trunk's vocab_size {trunk.config.vocab_size} differs from the {self.n_words} "
                              f"tokens of {self.tokenizer_path}")
        self._model_config = MMConfig(trunk=trunk.config, vision=c.vision, image_adapter=c.adapter)
        with torch.device(runtime.device):
            model = MMLlama(self._model_config, trunk=trunk)
        if c.init_vision is not None:
            parts = read_ours_parts(Path(c.init_vision))
            if "vision" not in parts:
                raise CheckpointError(f"{c.init_vision}: init_vision needs a checkpoint with a 'vision' part "
                                      f"(found parts {sorted(parts)})")
            vision = {k.removeprefix("vision."): v for k, v in parts["vision"][1].items() if k.startswith("vision.")}
            try:
                model.vision.load_state_dict(vision, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{c.init_vision}: its ViT does not fit the vision config: {e}") from None
        model.trunk.requires_grad_(False)
        if not c.train_vision:
            model.vision.requires_grad_(False)
            self._frozen["vision"] = {k: v.detach().cpu().clone() for k, v in model.vision.state_dict().items()}
        return model

    def blocks(self, model: MMLlama) -> list[nn.Module]:
        return training_blocks(model)

    def checkpoint_blocks(self, model: MMLlama) -> list[nn.Module]:
        return checkpointed_blocks(model, self.config.train_vision)

    def batches(self, runtime: Runtime, start: int) -> Iterator[dict]:
        source = ImageTextBatches(self.config.data, rank=runtime.rank, world_size=runtime.world_size)
        for batch in source.batches(start):
            yield {**batch, "images": batch["images"].to(runtime.device), "tokens": batch["tokens"].to(runtime.device),
                   "labels": batch["labels"].to(runtime.device)}

    def n_targets(self, batch: dict) -> int:
        return answer_targets(batch)

    def loss(self, model: MMLlama, batch: dict) -> torch.Tensor:
        # The whole model, image encoder included, runs inside one forward (FSDP).
        return chat_loss(model, batch, Media(images=batch["images"]))

    def save(self, trainable: dict[str, torch.Tensor], out: Path) -> None:
        # The same layout as save_mmllama(fmt="ours"): MMLlama.from_pretrained loads the directory as it is.
        c = self.config
        state = dict(trainable)
        if not c.train_vision:
            state |= {f"vision.{k}": v for k, v in self._frozen["vision"].items()}
        parts = split_parts(state, self._model_config.part_configs())
        if c.trunk is not None:
            # `out` is a temporary directory beside the final one: a path relative to it is right for both.
            write_ours(out, trunk=trunk_reference(Path(c.trunk), out, self._trunk_fingerprint), parts=parts)
        else:
            write_ours(out, trunk={"config": LlamaConfig.preset(c.trunk_preset).to_dict()}, parts=parts,
                       trunk_weights=self._frozen["trunk"])
        shutil.copy2(self.tokenizer_path, out / "tokenizer.model")

    def load(self, ckpt: Path) -> dict[str, torch.Tensor]:
        parts = read_ours_parts(ckpt)
        if not {"vision", "image_adapter"} <= parts.keys():
            raise CheckpointError(f"{ckpt}: not an image-adapter checkpoint (parts {sorted(parts)})")
        state = {k: v for _, tensors in parts.values() for k, v in tensors.items()}
        if not self.config.train_vision:  # saved alongside, but not trained: the loop restores trainables only
            state = {k: v for k, v in state.items() if not k.startswith("vision.")}
        return state


def main(config_path: str | None, overrides: Sequence[str] = (), resume: bool = False) -> TrainResult:
    return run_stage(ImageAdapterStageConfig, ImageAdapterStage, config_path, overrides, resume,
                     result_name="image-adapter checkpoint")
