"""Stage `speech-pretrain` (paper §8.3.1, DESIGN §3.6 and §6): BEST-RQ self-supervised pre-training of the conformer
speech encoder on audio alone. Spans of the normalised log-mel input are replaced by noise; at each encoder frame
whose 4 mel frames are all masked, 16 softmax heads predict the codes that the clean frames fall nearest to in 16
frozen random codebooks (`encoders.best_rq`). The encoder and the heads train; the quantizer has nothing to train.

    mm-llama data pack --kind speech --input utterances.jsonl --out data/speech
    mm-llama train speech-pretrain --config configs/speech_pretrain_debug.yaml [--train.steps=500 ...] [--resume]

Masks and noise are drawn in the data iterator from a generator seeded by (data.seed, batch index): the same for a
batch whatever the run, so a resumed run sees exactly what an uninterrupted one does. The loss is a sum over
(target frame, codebook) pairs; the loop divides by their count.

Checkpoints are in mm-llama's format with no trunk and two parts: "speech_encoder" (the `SpeechEncoder`, with its
config: what the speech-adapter stage starts from) and "best_rq" (the heads, and the quantizer's projection and
codebooks, so the targets are known after a load).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoders.best_rq import BestRQConfig, RandomProjectionQuantizer, mask_frames, span_mask, target_frames
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from mm_llama.checkpoints.ours import read_ours_parts, write_ours
from mm_llama.data.speech import SpeechBatches, SpeechDataConfig
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.train.distributed import Runtime
from mm_llama.train.loop import TrainConfig, TrainResult, run_stage


@dataclass(kw_only=True)
class SpeechPretrainStageConfig:
    """The stage's YAML: the encoder (a preset allowed), BEST-RQ's settings, data and train sections."""

    encoder: SpeechEncoderConfig
    best_rq: BestRQConfig = field(default_factory=BestRQConfig)
    data: SpeechDataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        e, q = self.encoder, self.best_rq
        if (e.stack, e.n_mels) != (q.stack, q.n_mels):
            raise ConfigError(f"best_rq stacks {q.stack} frames of {q.n_mels} mels, the encoder {e.stack} of "
                              f"{e.n_mels}: the targets must be computed on the encoder's frames; make them equal")


class BestRQModel(nn.Module):
    """The encoder, one linear head per codebook (fused), and the frozen quantizer."""

    def __init__(self, encoder: SpeechEncoderConfig, best_rq: BestRQConfig):
        super().__init__()
        self.encoder = SpeechEncoder(encoder)
        self.heads = nn.Linear(encoder.dim, best_rq.n_codebooks * best_rq.codebook_size)
        self.quantizer = RandomProjectionQuantizer(best_rq)

    def forward(self, masked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """masked (B, T, 80) noised mel, lengths (B,) -> logits (B, S, K, N)."""
        frames, _ = self.encoder(masked, lengths)
        q = self.quantizer.config
        return self.heads(frames).unflatten(-1, (q.n_codebooks, q.codebook_size))


class SpeechPretrainStage:
    name = "speech-pretrain"

    def __init__(self, config: SpeechPretrainStageConfig):
        self.config = config

    def build(self, runtime: Runtime) -> nn.Module:
        return BestRQModel(self.config.encoder, self.config.best_rq).to(runtime.device)

    def blocks(self, model: BestRQModel) -> list[nn.Module]:
        return list(model.encoder.layers)

    def batches(self, runtime: Runtime, start: int) -> Iterator[dict]:
        c = self.config
        source = SpeechBatches(c.data, rank=runtime.rank, world_size=runtime.world_size)
        for index, batch in enumerate(source.batches(start), start=start):
            # The batch's own generator: its masks and noise do not depend on what ran before (exact resume).
            generator = torch.Generator().manual_seed(c.data.seed * 1_000_003 + runtime.rank * 7919 + index)
            mel, lengths = batch["mel"], batch["lengths"]
            mask = span_mask(lengths, mel.shape[1], c.best_rq, generator)  # (B, T)
            masked = mask_frames(mel, mask, c.best_rq.noise_std, generator)
            yield {**batch, "mel": mel.to(runtime.device), "masked": masked.to(runtime.device),
                   "lengths": lengths.to(runtime.device), "targets": target_frames(mask, c.best_rq.stack)}

    def n_targets(self, batch: dict) -> int:
        return int(batch["targets"].sum()) * self.config.best_rq.n_codebooks

    def loss(self, model: BestRQModel, batch: dict) -> torch.Tensor:
        """Cross-entropy of every codebook's head at the target frames, summed (masked frames only, §8.3.1)."""
        codes = model.quantizer(model.encoder.stacked(batch["mel"], batch["lengths"]))  # (B, S, K) from clean frames
        logits = model(batch["masked"], batch["lengths"])  # (B, S, K, N)
        targets = batch["targets"].to(logits.device)  # (B, S)
        return F.cross_entropy(logits[targets].flatten(0, 1).float(), codes[targets].flatten(), reduction="sum")

    def save(self, trainable: dict[str, torch.Tensor], out: Path) -> None:
        c = self.config
        encoder = {f"speech_encoder.{k.removeprefix('encoder.')}": v for k, v in trainable.items()
                   if k.startswith("encoder.")}
        heads = {f"best_rq.{k}": v for k, v in trainable.items() if k.startswith("heads.")}
        if rest := sorted(k for k in trainable if not k.startswith(("encoder.", "heads."))):
            raise CheckpointError(f"tensors {rest[:5]} belong to no part of the speech-pretrain checkpoint")
        # Seeded, so the same as the model's; stored so that a checkpoint alone says what its targets were.
        quantizer = {f"best_rq.quantizer.{k}": v for k, v in RandomProjectionQuantizer(c.best_rq).state_dict().items()}
        # Full names, as every mm-llama part: "speech_encoder.*" is `MMLlama.speech_encoder`'s state.
        write_ours(out, trunk={}, parts={"speech_encoder": (dataclasses.asdict(c.encoder), encoder),
                                         "best_rq": (dataclasses.asdict(c.best_rq), {**heads, **quantizer})})

    def load(self, ckpt: Path) -> dict[str, torch.Tensor]:
        parts = read_ours_parts(ckpt)
        if not {"speech_encoder", "best_rq"} <= parts.keys():
            raise CheckpointError(f"{ckpt}: not a speech-pretrain checkpoint (parts {sorted(parts)})")
        return {**{f"encoder.{k.removeprefix('speech_encoder.')}": v for k, v in parts["speech_encoder"][1].items()},
                **{k.removeprefix("best_rq."): v for k, v in parts["best_rq"][1].items()
                   if k.startswith("best_rq.heads.")}}


def main(config_path: str | None, overrides: Sequence[str] = (), resume: bool = False) -> TrainResult:
    return run_stage(SpeechPretrainStageConfig, SpeechPretrainStage, config_path, overrides, resume,
                     result_name="speech-pretrain checkpoint")
