"""Speech shards (`flac` | `wav`, as `mm-llama data pack --kind speech` writes them) → normalised log-mel batches for
`speech-pretrain` (BEST-RQ needs audio only; transcripts and tasks are the speech-adapter stage's).

Each utterance is read at 16 kHz mono (`encoders.audio.load_audio`); one longer than `max_seconds` is cropped to that
length at an offset drawn from (seed, sample key): the same crop on every pass and after a resume (§8.3.1: over 60 s,
a random 6,000-frame crop). Features are `encoders.audio.log_mel` and `normalize`, per utterance, so the batch does
not change an utterance's features.

Batch legend: B = batch_size rows, T = the longest utterance's frames (≤ max_seconds · 100), 80 mel channels.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile
import torch

from encoders.audio import HOP, SAMPLE_RATE, load_audio, log_mel, normalize
from mm_llama.data.pipeline import BadSample, ShardBatches, shard_config_problems
from mm_llama.errors import ConfigError, InputError

__all__ = ["SpeechBatches", "SpeechDataConfig", "decode_audio"]

_AUDIO_MEMBERS = ("flac", "wav")


@dataclass
class SpeechDataConfig:
    """The `data:` section of `speech-pretrain`.

    Args:
        shards: a brace pattern, a directory (all its `*.tar`) or a `.txt` shard list (see `expand_shards`).
        batch_size: utterances per batch on each rank.
        max_seconds: longer utterances are cropped to this many seconds (the paper: 60).
        min_seconds: shorter utterances are skipped and counted as bad (a BEST-RQ target needs whole masked groups).
        shuffle_buffer, seed, resampled, num_workers, max_skip_fraction: as every shard-reading stage's.
    """

    shards: str
    batch_size: int = 8
    max_seconds: float = 60.0
    min_seconds: float = 0.5
    shuffle_buffer: int = 1000
    seed: int = 0
    resampled: bool = True
    num_workers: int = 0
    max_skip_fraction: float = 0.01

    def __post_init__(self) -> None:
        problems = shard_config_problems(self, {"batch_size": 1, "shuffle_buffer": 0, "seed": 0, "num_workers": 0},
                                         paths=("shards",))
        for name in ("max_seconds", "min_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                problems.append(f"data.{name} must be a number > 0, got {value!r}")
        if not problems and self.min_seconds > self.max_seconds:
            problems.append(f"data.min_seconds ({self.min_seconds}) is above data.max_seconds ({self.max_seconds})")
        if problems:
            raise ConfigError("invalid SpeechDataConfig: " + "; ".join(problems))


def decode_audio(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """An audio member's bytes -> (samples (n, channels) float32, rate) at the file's own rate; InputError when it
    does not decode."""
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise InputError(f"{name} does not decode ({e})") from None
    return samples, rate


class _Decode:
    """sample -> (key, audio bytes), or `BadSample` (picklable for DataLoader workers). Checked at the file's own
    rate (decodes, has finite samples, is long enough): resampling is `_Prepare`'s, once, for delivered samples."""

    def __init__(self, min_seconds: float):
        self.min_seconds = min_seconds

    def __call__(self, sample: dict) -> tuple[str, bytes]:
        key = sample["__key__"]
        member = next((m for m in _AUDIO_MEMBERS if m in sample), None)
        if member is None:
            have = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"sample {key} has no audio member ({'/'.join(_AUDIO_MEMBERS)}; it has {have})")
        try:  # read here, so that a bad file is counted even when fast-forwarded over
            samples, rate = decode_audio(sample[member], f"sample {key}'s {member}")
            wave = load_audio((samples, rate), sample_rate=rate)  # its checks, no resampling
        except InputError as e:
            raise BadSample(str(e)) from None
        if len(wave) < self.min_seconds * rate:
            raise BadSample(f"sample {key} is {len(wave) / rate:.2f} s long, under data.min_seconds "
                            f"({self.min_seconds:g} s)")
        return key, sample[member]


class _Prepare:
    """(key, bytes) -> the utterance's 16 kHz waveform, cropped to `max_seconds` at an offset seeded by the key (the
    crop is cut at the file's rate, before resampling: an hour-long file resamples one minute)."""

    def __init__(self, max_seconds: float, seed: int):
        self.max_seconds, self.seed = max_seconds, seed
        self.max_samples = int(max_seconds * SAMPLE_RATE) // HOP * HOP

    def __call__(self, item: tuple[str, bytes]) -> torch.Tensor:
        key, data = item
        samples, rate = decode_audio(data, key)
        longest = math.ceil(self.max_seconds * rate)
        if len(samples) > longest:
            start = random.Random(f"{self.seed}/{key}").randrange(len(samples) - longest + 1)
            samples = samples[start : start + longest]
        return load_audio((samples, rate))[: self.max_samples]


def _collate(waves: list[torch.Tensor]) -> dict:
    lengths = torch.tensor([len(w) for w in waves])
    mel, frames = log_mel(torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), lengths)
    return {"mel": normalize(mel, frames), "lengths": frames, "samples": len(waves)}


class SpeechBatches:
    """Normalised log-mel batches of one data-parallel rank, deterministic and resumable at any batch."""

    def __init__(self, config: SpeechDataConfig, *, rank: int = 0, world_size: int = 1):
        self.config = config
        self._source = ShardBatches(config, rank=rank, world_size=world_size, decode=_Decode(config.min_seconds),
                                    prepare=_Prepare(config.max_seconds, config.seed), collate=_collate)
        self.shards = self._source.shards

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from batch `start` on: {"mel": (B, T, 80) float32, "lengths": (B,) long frames, "samples": B,
        "skipped": bad samples since the previous batch}."""
        return self._source.batches(start)
