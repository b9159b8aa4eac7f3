"""The speech medium's input side (Llama 3 paper §8): audio files or arrays -> mono 16 kHz waveforms -> 80-dim log-mel
features, one frame every 10 ms.

Features: the speech encoder reads 80-dimensional mel-spectrogram features and stacks 4 frames into one 40 ms step
(§8.2.1), so a frame is 10 ms (HOP = 160 samples at 16 kHz). The paper does not state the sample rate or the window;
16 kHz and a 25 ms Hann window (n_fft = 400) are the usual setting for such features (Whisper, BEST-RQ, Conformer).
The power spectrum goes through torchaudio's HTK mel filterbank (torchaudio's `MelSpectrogram` defaults), then a
natural log with a floor of 1e-10, so digital silence gives a finite -23.03 rather than -inf.

Framing: no centering. Frame t covers samples [HOP * t, HOP * t + WINDOW), and each waveform is padded on the right
with WINDOW - HOP zeros, so an utterance of n samples has exactly n // HOP frames (10 ms of audio gives one frame) and
the frame count never depends on the batch. Before framing, the samples past each utterance's length are zeroed, so
whatever pads a batch cannot leak into an utterance's last frames: an utterance's features are the same alone or in
any batch (up to float rounding), and its padding frames are exactly 0.

Normalisation (`normalize`): BEST-RQ (§8.3.1) quantises normalised input, so features are normalised per utterance
and per mel channel over that utterance's own frames, again so that a batch does not change an utterance.

Loading (`load_audio`): libsndfile through soundfile (WAV, FLAC, OGG/Vorbis, MP3, AIFF, ...), channels mixed down
by their mean, resampled with torchaudio's windowed-sinc `resample`. Local files only: a URL is refused.

Shapes: B batch, n samples, T frames, 80 mel channels.
"""

from __future__ import annotations

import functools
import math
from numbers import Integral
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio

from mm_llama.errors import ConfigError, InputError
from mm_llama.paths import local_path

SAMPLE_RATE = 16_000  # Hz
N_MELS = 80  # §8.2.1
HOP = 160  # 10 ms at 16 kHz: 4 stacked frames make the encoder's 40 ms step (§8.2.1)
WINDOW = 400  # 25 ms at 16 kHz, also the FFT size (201 frequency bins)
LOG_FLOOR = 1e-10  # mel power floor before the log: silence gives log(1e-10), not -inf
NORM_EPS = 1e-5  # added to the variance in `normalize`: a constant channel (silence) becomes 0, not NaN

ACCEPTED = "an audio file: WAV, FLAC, OGG/Vorbis, MP3, AIFF, ... (anything libsndfile reads)"
ACCEPTED_TUPLE = ("a (waveform, sample_rate) tuple: a float numpy array or torch tensor of shape (n,) or "
                  "(n, channels), and a positive int sample rate in Hz")
# torchaudio's resampling kernel has (new / g) x (old / g) taps, g = gcd of the rates: 44 101 Hz -> 16 kHz would take
# 700 M taps (minutes, gigabytes). Every common rate (8 k, 11.025 k, 22.05 k, 44.1 k, 48 k, 96 k ...) is far below.
_MAX_RESAMPLE_TAPS = 1 << 23


def load_audio(source, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> torch.Tensor:
    """Read an audio file, or take an in-memory waveform, as a mono float32 waveform at `sample_rate`.

    Args:
        source: a local file path (str or pathlib.Path), or a `(waveform, sample_rate)` tuple whose waveform is a
            float numpy array or torch tensor of shape (n,) or (n, channels) (soundfile's layout).
        sample_rate: the rate to return, in Hz (the speech encoder's `SAMPLE_RATE`).
        max_seconds: longer audio is refused (checked at the source's own rate); None accepts any length.

    Returns:
        (n,) float32 waveform at `sample_rate`, channels mixed down by their mean.

    Raises:
        InputError: a URL, a missing, empty or unreadable file, a bad tuple, no samples, NaN or infinite samples,
            audio longer than `max_seconds`, or a rate that cannot be resampled at a sane cost.
        ConfigError: a non-positive `sample_rate` or `max_seconds`.
    """
    if not _positive_int(sample_rate):
        raise ConfigError(f"load_audio: sample_rate must be a positive int, got {sample_rate!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"load_audio: max_seconds must be positive or None, got {max_seconds!r}")
    name = audio_name(source)
    if isinstance(source, tuple):
        samples, rate = _from_tuple(source, name, max_seconds)
    else:
        samples, rate = _from_file(source, name, max_seconds)  # (n, channels)
    if samples.shape[0] == 0:
        raise InputError(f"{name} has no samples (0 s of audio)")
    bad = ~torch.isfinite(samples)
    if bad.any():
        n_nan = int(torch.isnan(samples).sum())
        raise InputError(f"{name} has {int(bad.sum())} non-finite samples of {samples.numel()} ({n_nan} NaN, "
                         f"{int(bad.sum()) - n_nan} infinite); expected finite samples")
    wave = samples.mean(dim=1)  # (n,)
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        if (rate // g) * (sample_rate // g) > _MAX_RESAMPLE_TAPS:
            raise InputError(f"{name} has a sample rate of {rate} Hz, which cannot be resampled to {sample_rate} Hz "
                             "at a sane cost (the rates share no large common factor); convert it to a common rate "
                             "(8000, 16000, 22050, 44100, 48000 Hz, ...) first")
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave.contiguous()


def audio_name(source) -> str:
    """How errors name an audio input: a `(waveform, sample_rate)` tuple, a file's bytes or a file."""
    if isinstance(source, tuple):
        return "audio (waveform, sample_rate) tuple"
    return "audio bytes" if isinstance(source, bytes | bytearray) else f"audio file {source}"


def _positive_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value > 0


def _check_duration(name: str, n: int, rate: int, max_seconds: float | None, n_total: int | None = None) -> None:
    """InputError if `n` samples at `rate` exceed `max_seconds`; `n_total` (the full length, when only `n` were read)
    is the duration reported."""
    if max_seconds is not None and n > max_seconds * rate:
        seconds = max(n, n_total or 0) / rate
        raise InputError(f"{name} is {seconds:.3f} s long, more than the limit of {max_seconds:g} s (max_seconds)")


def _from_file(source, name: str, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    """(samples (n, channels) float32, rate) of a local file."""
    path: Path = local_path(source, "audio file")
    if not path.is_file():
        raise InputError(f"{name} does not exist or is not a file; expected {ACCEPTED}")
    if path.stat().st_size == 0:
        raise InputError(f"{name} is empty (0 bytes); expected {ACCEPTED}")
    try:
        with soundfile.SoundFile(path) as f:
            # With a limit, read one frame past it at most: a 3-hour file costs no more memory than the limit.
            limit = -1 if max_seconds is None else math.floor(max_seconds * f.samplerate) + 1
            data = f.read(frames=limit, dtype="float32", always_2d=True)  # (n, channels)
            rate, n_header = f.samplerate, f.frames
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise InputError(f"{name} cannot be read as audio ({e}); expected {ACCEPTED}") from e
    _check_duration(name, len(data), rate, max_seconds, n_total=n_header)  # the header has the full length
    return torch.from_numpy(data), rate


def _from_tuple(source: tuple, name: str, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    """(samples (n, channels) float32, rate) of an in-memory waveform, checked."""
    if len(source) != 2:
        raise InputError(f"{name} has {len(source)} items; expected {ACCEPTED_TUPLE}")
    waveform, rate = source
    if not _positive_int(rate):
        raise InputError(f"{name} has sample rate {rate!r}; expected {ACCEPTED_TUPLE}")
    if isinstance(waveform, np.ndarray):
        if not np.issubdtype(waveform.dtype, np.floating):
            raise InputError(f"{name} has a waveform of dtype {waveform.dtype}; expected {ACCEPTED_TUPLE} "
                             "(integer PCM: scale it to [-1, 1] first)")
        samples = torch.tensor(waveform, dtype=torch.float32)  # a copy: the caller's array may be read-only
    elif isinstance(waveform, torch.Tensor):
        if not waveform.is_floating_point():
            raise InputError(f"{name} has a waveform of dtype {waveform.dtype}; expected {ACCEPTED_TUPLE} "
                             "(integer PCM: scale it to [-1, 1] first)")
        samples = waveform.detach().to(torch.float32)
    else:
        raise InputError(f"{name} has a waveform of type {type(waveform).__name__}; expected {ACCEPTED_TUPLE}")
    if samples.ndim == 1:
        samples = samples[:, None]  # (n, 1)
    # More channels than samples is torchaudio's (channels, n) layout, not audio in soundfile's (n, channels).
    if samples.ndim != 2 or samples.shape[1] == 0 or samples.shape[1] > max(samples.shape[0], 1):
        raise InputError(f"{name} has a waveform of shape {tuple(waveform.shape)}; expected {ACCEPTED_TUPLE} "
                         "(for torchaudio's (channels, n) layout, pass waveform.T)")
    _check_duration(name, samples.shape[0], rate, max_seconds)
    return samples, int(rate)


@functools.cache
def _mel_filters(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hann window (WINDOW,), mel filterbank (WINDOW // 2 + 1, N_MELS)), built once per device."""
    window = torch.hann_window(WINDOW, device=device)  # periodic, as torchaudio's Spectrogram
    fbank = torchaudio.functional.melscale_fbanks(WINDOW // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE)
    return window, fbank.to(device)


def log_mel(waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """80-dim log-mel features, one frame per 10 ms, of (a batch of right-padded) 16 kHz waveforms.

    Args:
        waveforms: (n,) or (B, n) float waveforms at `SAMPLE_RATE`, right-padded when batched (padding content is
            ignored).
        lengths: (B,) each waveform's length in samples; None means all n.

    Returns:
        features: (B, T, 80) float32, log(max(mel power, 1e-10)); frames at and past a waveform's frame length are 0.
        frame_lengths: (B,) long, lengths // HOP; T = n // HOP.

    Raises:
        InputError: a waveform that is not a 1-D or 2-D float tensor, lengths of the wrong shape or out of [0, n],
            a waveform shorter than 10 ms (no frame), or non-finite samples.
    """
    if not isinstance(waveforms, torch.Tensor) or not waveforms.is_floating_point() or waveforms.ndim not in (1, 2):
        got = tuple(waveforms.shape) if isinstance(waveforms, torch.Tensor) else type(waveforms).__name__
        raise InputError(f"log_mel takes a float tensor of shape (n,) or (B, n) at 16 kHz, got {got}")
    waves = waveforms.to(torch.float32)
    waves = waves[None] if waves.ndim == 1 else waves  # (B, n)
    B, n = waves.shape
    lengths = torch.full((B,), n) if lengths is None else torch.as_tensor(lengths, device=waves.device)
    if lengths.shape != (B,) or lengths.is_floating_point() or not ((lengths >= 0) & (lengths <= n)).all():
        raise InputError(f"log_mel: lengths must be {B} integer sample counts in [0, {n}], got {lengths.tolist()}")
    lengths = lengths.to(waves.device, torch.long)
    short = (lengths < HOP).nonzero().flatten().tolist()
    if short:
        which = "audio" if waveforms.ndim == 1 else f"audio {short[0]} of the batch"
        raise InputError(f"{which} has {int(lengths[short[0]])} samples, shorter than 10 ms ({HOP} samples at "
                         "16 kHz): it has no feature frame; expected at least 10 ms of audio")
    valid = torch.arange(n, device=waves.device) < lengths[:, None]  # (B, n)
    if not torch.isfinite(waves[valid]).all():
        raise InputError("log_mel: the waveforms have NaN or infinite samples")
    # Zero what pads each waveform, then pad all on the right: frame t = samples [HOP t, HOP t + WINDOW).
    waves = F.pad(torch.where(valid, waves, 0.0), (0, WINDOW - HOP))  # (B, n + WINDOW - HOP)
    window, fbank = _mel_filters(waves.device)
    spec = torch.stft(waves, n_fft=WINDOW, hop_length=HOP, win_length=WINDOW, window=window, center=False,
                      return_complex=True)  # (B, WINDOW // 2 + 1, T)
    mel = spec.abs().pow(2).transpose(1, 2) @ fbank  # (B, T, 80)
    features = torch.log(mel.clamp(min=LOG_FLOOR))
    frame_lengths = lengths // HOP  # (B,)
    frame_valid = torch.arange(features.shape[1], device=waves.device) < frame_lengths[:, None]  # (B, T)
    return features.masked_fill(~frame_valid[..., None], 0.0), frame_lengths


def normalize(features: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
    """Per-utterance, per-channel mean and variance normalisation over each utterance's own frames.

    Args:
        features: (B, T, C) features, e.g. from `log_mel`.
        frame_lengths: (B,) valid frames per utterance.

    Returns:
        (B, T, C) float32: (x - mean) / sqrt(var + 1e-5) on valid frames (population variance), 0 on padding frames.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 3 or not features.is_floating_point():
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InputError(f"normalize takes (B, T, C) float features, got {got}")
    B, T, _ = features.shape
    frame_lengths = torch.as_tensor(frame_lengths, device=features.device)
    if frame_lengths.shape != (B,) or frame_lengths.is_floating_point() or not (
            (frame_lengths >= 0) & (frame_lengths <= T)).all():
        raise InputError(f"normalize: frame_lengths must be {B} integer frame counts in [0, {T}], "
                         f"got {frame_lengths.tolist()}")
    # float64 statistics: a constant channel's mean is then its value exactly, so silence normalises to exactly 0.
    x = features.to(torch.float64)
    mask = (torch.arange(T, device=x.device) < frame_lengths[:, None])[..., None]  # (B, T, 1)
    count = frame_lengths.clamp(min=1)[:, None, None].to(torch.float64)  # (B, 1, 1)
    mean = torch.where(mask, x, 0.0).sum(dim=1, keepdim=True) / count  # (B, 1, C)
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum(dim=1, keepdim=True) / count  # (B, 1, C)
    return torch.where(mask, (x - mean) / torch.sqrt(var + NORM_EPS), 0.0).to(torch.float32)
