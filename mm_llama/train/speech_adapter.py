"""Stage `speech-adapter` (paper §8.3.2, DESIGN §6): the speech encoder and the speech adapter learn to put speech
into a frozen model's token stream: recognition (`asr`), translation (`ast`) and spoken dialogue (`dialogue`, with a
picture when the sample has one), next-token loss on the target tokens only (`mm_llama.data.speech_chat`).

    mm-llama train speech-pretrain --config configs/demo/speech_pretrain.yaml
    mm-llama train speech-adapter --config configs/demo/speech_adapter.yaml [--train.steps=500 ...] [--resume]

`base_model` is the frozen model the speech enters: an mm-llama checkpoint (a stage lm, image-adapter or
video-adapter checkpoint, or "demo"); its trunk and parts stay as they are, except speech parts it has already
(the embedded model's): the ones trained here replace them. The encoder starts from a speech-pretrain
checkpoint (`pretrained_encoder`: its config and weights, what BEST-RQ learnt) or, without one, from random weights
of `encoder`; with `init_from` instead, the encoder and the adapter continue a model's own (fine-tuning a model that
hears, e.g. on a new accent). The media-token rows (`<|speech_start|>`, `<|speech_end|>`, …) train only when the
base model has none (a text model); a base model's rows stay frozen, so its pictures and clips read as before.
Checkpoints hold the whole model in mm-llama's format, the trunk by reference (as the video stage's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from adapters.speech import SpeechAdapterConfig
from encoders.speech import SpeechEncoderConfig
from mm_llama.checkpoints.ours import read_index, read_ours_parts
from mm_llama.config import from_dict
from mm_llama.data.spec_augment import SpecAugmentConfig, spec_augment
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
    """The stage's YAML: the frozen `base_model`, where the speech parts start (`pretrained_encoder`, a speech-pretrain
    checkpoint's encoder, or a fresh `encoder`, with a fresh adapter; or `init_from`, a model's encoder and adapter,
    to continue them), the adapter, data and train sections, and optionally `spec_augment`."""

    base_model: str
    pretrained_encoder: str | None = None
    encoder: SpeechEncoderConfig | None = None
    init_from: str | None = None  # a model (or "demo") whose speech encoder and adapter the stage continues
    adapter: SpeechAdapterConfig
    data: SpeechChatDataConfig
    train: TrainConfig
    spec_augment: SpecAugmentConfig | None = None  # masks on the training utterances' mel (none without the section)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.pretrained_encoder, self.encoder, self.init_from)) != 1:
            raise ConfigError("give exactly one of pretrained_encoder (a speech-pretrain checkpoint: its encoder), "
                              "encoder (a fresh one: a preset or fields) and init_from (a model whose speech encoder "
                              "and adapter to continue)")
        if self.data.max_seconds > self.adapter.max_seconds:
            raise ConfigError(f"data.max_seconds ({self.data.max_seconds:g}) is over adapter.max_seconds "
                              f"({self.adapter.max_seconds:g}), the longest utterance one span holds")


_SPEECH_PARTS = ("speech_encoder", "speech_adapter")


def _part(parts: dict, name: str, cls: type, path: Path, what: str, accepted: str) -> tuple[object, dict]:
    """Part `name` of checkpoint `path`'s `parts` (`read_ours_parts`): its config as `cls` and its tensors (full
    names); a `CheckpointError` starting with `what` and naming `accepted` when the checkpoint has none."""
    if parts.get(name, (None,))[0] is None:
        stored = sorted(read_index(path).get("parts") or {})
        raise CheckpointError(f"{what}: no {name.replace('_', ' ')} in it (parts {stored}); give {accepted}")
    config, tensors = parts[name]
    return from_dict(cls, config, source=f"{path} {name}"), dict(tensors)


def pretrained_encoder(path: str | Path) -> tuple[SpeechEncoderConfig, dict[str, torch.Tensor]]:
    """A checkpoint's speech encoder: its config and its tensors (full names, "speech_encoder.*")."""
    path = Path(path)
    return _part(read_ours_parts(path, ["speech_encoder"]), "speech_encoder", SpeechEncoderConfig, path, str(path),
                 "a speech-pretrain checkpoint")


def speech_parts(name: str, adapter: SpeechAdapterConfig) -> tuple[SpeechEncoderConfig, dict, dict]:
    """Model `name`'s speech encoder (config, tensors) and adapter tensors, for the stage to continue; its adapter must
    be the stage's `adapter` section."""
    path, what = checkpoint_path(name), f"init_from {name}"
    accepted = "a model that hears: a speech-adapter checkpoint or 'demo'"
    try:
        parts = read_ours_parts(path, _SPEECH_PARTS)  # not the base's other parts (an 11B model's are 7 GB)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e} ({accepted})") from None
    encoder, encoder_state = _part(parts, "speech_encoder", SpeechEncoderConfig, path, what, accepted)
    theirs, adapter_state = _part(parts, "speech_adapter", SpeechAdapterConfig, path, what, accepted)
    if theirs != adapter:
        raise ConfigError(f"{what}: its speech adapter is {theirs}, the adapter section {adapter}; make the section "
                          "the model's")
    return encoder, encoder_state, adapter_state


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
                                     "'demo'", trains=_SPEECH_PARTS, announce=runtime.is_main and c.init_from is None)
        if c.init_from is not None and runtime.is_main:
            print(f"the speech encoder and adapter continue init_from {c.init_from}'s", flush=True)
        base = self._base.config
        encoder_state, adapter_state = {}, {}
        encoder = c.encoder
        if c.pretrained_encoder is not None:
            encoder, encoder_state = pretrained_encoder(c.pretrained_encoder)
        if c.init_from is not None:
            encoder, encoder_state, adapter_state = speech_parts(c.init_from, c.adapter)
        if c.adapter.in_dim != encoder.dim:
            raise ConfigError(f"adapter.in_dim ({c.adapter.in_dim}) must equal the speech encoder's dim "
                              f"({encoder.dim})")
        if not base.has_media:  # a text model: the speech tokens' rows are new, and learn
            self._trained_parts += ("media",)
        model = self._base.build(replace(base, speech_encoder=encoder, speech_adapter=c.adapter), runtime.device,
                                 new=self._trained_parts)
        source = f"pretrained_encoder {c.pretrained_encoder}" if c.init_from is None else f"init_from {c.init_from}"
        for part, state in (("speech_encoder", encoder_state), ("speech_adapter", adapter_state)):
            if not state:
                continue
            try:
                getattr(model, part).load_state_dict({k.removeprefix(f"{part}."): v.float() for k, v in state.items()},
                                                     strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{source}: its {part} weights do not fit its config ({e})") from None
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
        for index, batch in enumerate(source.batches(start), start):  # index: the micro-batch's data position
            images, speech = batch["images"], batch["speech"].to(runtime.device)
            if c.spec_augment is not None:
                speech = spec_augment(speech, c.spec_augment, index, runtime.rank)
            yield {**batch, "speech": speech,
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
