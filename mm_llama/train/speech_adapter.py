"""Stage `speech-adapter` (paper §8.3.2, DESIGN §6): the speech encoder and the speech adapter learn to put speech
into a frozen model's token stream: recognition (`asr`), translation (`ast`) and spoken dialogue (`dialogue`, with a
picture when the sample has one), next-token loss on the target tokens only (`mm_llama.data.speech_chat`).

    mm-llama train speech-pretrain --config configs/demo/speech_pretrain.yaml
    mm-llama train speech-adapter --config configs/demo/speech_adapter.yaml [--train.steps=500 ...] [--resume]

`base_model` is the frozen model the speech enters: an mm-llama checkpoint (a stage lm, image-adapter or
video-adapter checkpoint, or "demo"); its trunk and parts stay as they are, except speech parts it has already
(the embedded model's): the ones trained here replace them. The encoder starts from a speech-pretrain
checkpoint (`pretrained_encoder`: its config and weights, what BEST-RQ learnt) or, without one, from random weights
of `encoder`. The media-token rows (`<|speech_start|>`, `<|speech_end|>`, …) train only when the base model has
none (a text model); a base model's rows stay frozen, so its pictures and clips read as before. Checkpoints hold
the whole model in mm-llama's format, the trunk by reference (as the video stage's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from adapters.speech import SpeechAdapterConfig
from encoders.speech import SpeechEncoderConfig
from mm_llama.checkpoints.ours import read_ours_parts
from mm_llama.config import from_dict
from mm_llama.data.speech_chat import SpeechChatBatches, SpeechChatDataConfig
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.media import Media
from mm_llama.model import MMLlama
from mm_llama.paths import checkpoint_path
from mm_llama.train.base_model import BaseModel, read_base_model
from mm_llama.train.distributed import Runtime
from mm_llama.train.image_adapter import answer_targets, chat_loss
from mm_llama.train.loop import TrainConfig, TrainResult, run_stage


@dataclass(kw_only=True)
class SpeechAdapterStageConfig:
    """The stage's YAML: the frozen `base_model`, the encoder (`pretrained_encoder`, a speech-pretrain checkpoint,
    or a fresh `encoder`), the adapter, data and train sections."""

    base_model: str
    pretrained_encoder: str | None = None
    encoder: SpeechEncoderConfig | None = None
    adapter: SpeechAdapterConfig
    data: SpeechChatDataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if (self.pretrained_encoder is None) == (self.encoder is None):
            raise ConfigError("give exactly one of pretrained_encoder (a speech-pretrain checkpoint: its encoder) and "
                              "encoder (a fresh one: a preset or fields)")
        if self.data.max_seconds > self.adapter.max_seconds:
            raise ConfigError(f"data.max_seconds ({self.data.max_seconds:g}) is over adapter.max_seconds "
                              f"({self.adapter.max_seconds:g}), the longest utterance one span holds")


_SPEECH_PARTS = ("speech_encoder", "speech_adapter")


def pretrained_encoder(path: str | Path) -> tuple[SpeechEncoderConfig, dict[str, torch.Tensor]]:
    """A checkpoint's speech encoder: its config and its tensors (full names, "speech_encoder.*")."""
    parts = read_ours_parts(Path(path))
    if "speech_encoder" not in parts or parts["speech_encoder"][0] is None:
        raise CheckpointError(f"{path}: no speech encoder in it (parts {sorted(parts)}); give a speech-pretrain "
                              "checkpoint")
    config, tensors = parts["speech_encoder"]
    return from_dict(SpeechEncoderConfig, config, source=f"{path} speech_encoder"), dict(tensors)


class SpeechAdapterStage:
    name = "speech-adapter"

    def __init__(self, config: SpeechAdapterStageConfig):
        self.config = config
        self.tokenizer_path = Path(config.data.tokenizer)
        self.base_model = checkpoint_path(config.base_model)
        self._model_config = None
        self._base: BaseModel | None = None  # the base model, whose parts are written with each checkpoint
        self._trained_parts = _SPEECH_PARTS

    def build(self, runtime: Runtime) -> nn.Module:
        c = self.config
        self._base = read_base_model(self.base_model, f"base_model {c.base_model}", "the speech stage builds on an "
                                     "mm-llama checkpoint: a stage lm, image-adapter or video-adapter checkpoint, or "
                                     "'demo'", trains=_SPEECH_PARTS, announce=runtime.is_main)
        base = self._base.config
        encoder_state = {}
        encoder = c.encoder
        if c.pretrained_encoder is not None:
            encoder, encoder_state = pretrained_encoder(c.pretrained_encoder)
        if c.adapter.in_dim != encoder.dim:
            raise ConfigError(f"adapter.in_dim ({c.adapter.in_dim}) must equal the speech encoder's dim "
                              f"({encoder.dim})")
        if not base.has_media:  # a text model: the speech tokens' rows are new, and learn
            self._trained_parts += ("media",)
        model = self._base.build(replace(base, speech_encoder=encoder, speech_adapter=c.adapter), runtime.device,
                                 new=self._trained_parts)
        if encoder_state:
            try:
                model.speech_encoder.load_state_dict(
                    {k.removeprefix("speech_encoder."): v.float() for k, v in encoder_state.items()}, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"pretrained_encoder {c.pretrained_encoder}: its weights do not fit its config "
                                      f"({e})") from None
        if not base.has_media:
            nn.init.normal_(model.media.learnable_embedding.weight, std=0.02)
        model.requires_grad_(False)
        for name in self._trained_parts:
            getattr(model, name).requires_grad_(True)
        self._model_config = model.config
        return model

    def blocks(self, model: MMLlama) -> list[nn.Module]:
        return [*model.trunk.layers, *model.speech_encoder.layers]

    def checkpoint_blocks(self, model: MMLlama) -> list[nn.Module]:
        return [*model.speech_encoder.layers, *model.trunk.layers]

    def batches(self, runtime: Runtime, start: int) -> Iterator[dict]:
        c = self.config
        # The built model's encoder (`build` runs first): its stacking sets each utterance's positions.
        source = SpeechChatBatches(c.data, c.adapter, self._model_config.speech_encoder.stack, rank=runtime.rank,
                                   world_size=runtime.world_size)
        for batch in source.batches(start):
            images = batch["images"]
            yield {**batch, "speech": batch["speech"].to(runtime.device),
                   "images": None if images is None else images.to(runtime.device),
                   "tokens": batch["tokens"].to(runtime.device), "labels": batch["labels"].to(runtime.device)}

    def n_targets(self, batch: dict) -> int:
        return answer_targets(batch)

    def loss(self, model: MMLlama, batch: dict) -> torch.Tensor:
        return chat_loss(model, batch, Media(images=batch["images"], speech=batch["speech"]))

    def save(self, trainable: dict[str, torch.Tensor], out: Path) -> None:
        """The trained speech parts with the base model's frozen parts (a loadable model), the trunk by reference,
        and the tokenizer."""
        self._base.save_with(out, trainable, self._model_config, self.tokenizer_path)

    def load(self, ckpt: Path) -> dict[str, torch.Tensor]:
        parts = read_ours_parts(ckpt)
        if "speech_adapter" not in parts:
            raise CheckpointError(f"{ckpt}: not a speech-adapter checkpoint (parts {sorted(parts)})")
        return {k: v for name in self._trained_parts if name in parts for k, v in parts[name][1].items()}


def main(config_path: str | None, overrides: Sequence[str] = (), resume: bool = False) -> TrainResult:
    return run_stage(SpeechAdapterStageConfig, SpeechAdapterStage, config_path, overrides, resume,
                     result_name="speech-adapter checkpoint")
