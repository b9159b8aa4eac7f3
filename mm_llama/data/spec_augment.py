"""SpecAugment (Park et al. 2019) for the speech-adapter stage: bands of mel bins and spans of frames set to zero, the
normalised features' mean, so the encoder learns to recover words from partial evidence rather than from every
phone. The masks are torchaudio's (`torchaudio.transforms.SpecAugment`, a different draw per utterance), drawn from a
seed of (config seed, the batch's data position, rank): a resumed run draws the masks an uninterrupted one draws.

Why the demo needs it: the held-out voice drops every /h/ (espeak-ng's West Midlands accent, `replace 00 h NULL`),
which no training accent does, and "How many …" and "How big …" questions were where spoken QA failed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchaudio.transforms import SpecAugment

from encoders.utterances import Utterances
from mm_llama.errors import ConfigError

__all__ = ["SpecAugmentConfig", "spec_augment"]


@dataclass
class SpecAugmentConfig:
    """The `spec_augment:` section: per utterance, `time_masks` spans of up to `time_mask_frames` frames (10 ms each),
    together at most `max_time_fraction` of the batch's frames, and `freq_masks` bands of up to `freq_mask_bins` of the
    80 mel bins. Spans are placed over the padded batch, so one that falls past an utterance's end masks nothing."""

    time_masks: int = 4
    time_mask_frames: int = 10
    max_time_fraction: float = 0.2
    freq_masks: int = 2
    freq_mask_bins: int = 15
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"spec_augment.{name} must be an integer >= 0, got {value!r}")
        if not 0.0 < self.max_time_fraction <= 1.0:
            raise ConfigError(f"spec_augment.max_time_fraction must be in (0, 1], got {self.max_time_fraction!r}")


def spec_augment(utterances: Utterances, config: SpecAugmentConfig, index: int, rank: int = 0) -> Utterances:
    """`utterances` with masked bands and spans, drawn from (config.seed, index: the batch's position in the data,
    rank); lengths unchanged."""
    augment = SpecAugment(config.time_masks, config.time_mask_frames, config.freq_masks, config.freq_mask_bins,
                          iid_masks=True, p=config.max_time_fraction, zero_masking=True)
    device = utterances.mel.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(hash((config.seed, index, rank)) % 2**63)  # ints hash to themselves: stable across runs
        masked = augment(utterances.mel.transpose(1, 2).unsqueeze(1)).squeeze(1).transpose(1, 2)  # (N, T, n_mels)
    return Utterances(masked, utterances.lengths, utterances.host_lengths)
