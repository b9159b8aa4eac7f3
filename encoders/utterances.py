"""Speech input for the composed model: `Utterances` (what `Media.speech` holds) and the chunking of long audio.

An utterance becomes one span of the token stream, `<|speech_start|>`, P × `<|speech|>`, `<|speech_end|>`, whose P
positions the speech adapter's embeddings fill (`MMLlama.speech_positions`: 60 s of audio = 750 positions). Audio
longer than the model's `speech_adapter.max_seconds` is never truncated: it is split into chunks of at most that
length, each its own span (`ask`), or its own transcription (`transcribe`, which joins them). A chunk ends at the
quietest 20 ms of the last quarter of its window (at most the last 5 s), so that a cut falls between words where
there is a pause; the last chunk holds the rest (a rest under 10 ms, shorter than one feature frame, is padded with
silence to 10 ms). `audio_chunks` reads a file one window at a time: an hour-long file costs one window's memory.

Silence: a chunk whose every sample is under SILENCE_DBFS (`is_silent`: digital silence, dither) holds nothing to
hear. No training sample is silent, and the demo model, given one, writes down a sentence of its world ("Is there a
yellow square?"), as Whisper makes up text for silence; `transcribe` skips such chunks and `ask` refuses audio that is
all silence.

Shapes: N utterances, T mel frames (10 ms each), 80 mel channels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import soundfile
import torch

from encoders.audio import ACCEPTED, HOP, SAMPLE_RATE, audio_name, load_audio, log_mel, normalize
from mm_llama.errors import InputError
from mm_llama.paths import local_path
from mm_llama.values import is_finite_number

__all__ = ["SILENCE_DBFS", "Utterances", "audio_chunks", "chunk_bounds", "is_silent", "quiet_cut"]

# Below this peak a chunk holds no sound: 16-bit dither is about -90 dBFS, quiet speech peaks above -40 dBFS, and the
# model hears speech normalised per utterance, so even a whisper recorded at low gain is far above it.
SILENCE_DBFS = -70.0


def is_silent(wave: torch.Tensor) -> bool:
    """True when every sample of `wave` (full scale 1.0) is under SILENCE_DBFS."""
    return bool(wave.abs().max() < 10 ** (SILENCE_DBFS / 20))


_QUIET_FRAME = 0.02  # s: the cut's resolution
_MAX_SEARCH = 5.0  # s: the cut is searched in the last quarter of a window, at most this long


@dataclass
class Utterances:
    """A batch's utterances as the speech encoder reads them, in the order of their spans in the token batch
    (sample by sample, left to right).

    mel: (N, T, 80) normalised log-mel features (`encoders.audio`), zero past each length.
    lengths: (N,) long mel frames; kept on the host as well (`host_lengths`), where the spans are laid out.
    """

    mel: torch.Tensor
    lengths: torch.Tensor
    host_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.host_lengths:
            self.host_lengths = tuple(int(n) for n in self.lengths.tolist())

    @classmethod
    def from_waves(cls, waves: Sequence[torch.Tensor]) -> Utterances:
        """16 kHz mono waveforms (n,) each (`load_audio`, `audio_chunks`) -> their features."""
        if not waves:
            raise InputError("no utterances: give at least one waveform")
        lengths = torch.tensor([len(w) for w in waves])
        mel, frames = log_mel(torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True), lengths)
        return cls(normalize(mel, frames), frames)

    def to(self, device: torch.device | str) -> Utterances:
        return Utterances(self.mel.to(device), self.lengths.to(device), self.host_lengths)

    def __len__(self) -> int:
        return len(self.host_lengths)


def chunk_bounds(wave: np.ndarray | torch.Tensor, rate: int, max_seconds: float) -> int:
    """Where to end the first chunk of mono `wave` (n,) at `rate`: n when it fits in `max_seconds`, else
    `quiet_cut` of its first `max_seconds`."""
    window = math.floor(max_seconds * rate)
    return len(wave) if len(wave) <= window else quiet_cut(wave[:window], rate)


def quiet_cut(window: np.ndarray | torch.Tensor, rate: int) -> int:
    """The middle of the quietest 20 ms in the last quarter of `window` (at most its last 5 s; (n,) mono or
    (n, channels), mixed down here, only where it is read): where a chunk that fills `window` ends."""
    n = len(window)
    frame = max(1, round(_QUIET_FRAME * rate))
    search = min(n // 4, round(_MAX_SEARCH * rate)) // frame * frame
    if search < frame:  # a window under 80 ms: cut at its end
        return n
    region = torch.as_tensor(np.asarray(window[n - search :]), dtype=torch.float64)
    if region.ndim == 2:
        region = region.mean(dim=1)
    energy = region.view(-1, frame).pow(2).sum(dim=1)  # (search / frame,)
    last_quietest = len(energy) - 1 - int(energy.flip(0).argmin())  # of equally quiet frames, the latest: longer chunks
    return n - search + last_quietest * frame + frame // 2


def _tail(wave: torch.Tensor, first: bool, name: str) -> torch.Tensor:
    """A later chunk under 10 ms (no feature frame) padded with silence to 10 ms. A first one that short is the whole
    input (a first chunk is at least 3/4 of a window): refused here, before its 0 positions reach a prompt."""
    if len(wave) >= HOP:
        return wave
    if first:
        raise InputError(f"{name} has {len(wave)} samples at 16 kHz ({len(wave) / 16:g} ms), shorter than 10 ms "
                         f"({HOP} samples): it has no feature frame; expected at least 10 ms of audio")
    return torch.nn.functional.pad(wave, (0, HOP - len(wave)))


def audio_chunks(source, max_seconds: float) -> Iterator[torch.Tensor]:
    """The 16 kHz mono chunks (n,) of one audio input, each at most `max_seconds` long, in order; together they are
    all of it.

    Args:
        source: a local file path, the file's bytes, or a `(waveform, sample_rate)` tuple (`encoders.audio`).
        max_seconds: the longest chunk.
    Raises:
        InputError: as `load_audio` (a missing or unreadable file, no samples, non-finite samples, ...), audio
            shorter than 10 ms (no feature frame), a `max_seconds` under 1.
    """
    if not is_finite_number(max_seconds) or max_seconds < 1:  # 0 would cut empty chunks forever
        raise InputError(f"audio_chunks: max_seconds must be a number >= 1, got {max_seconds!r}")
    if isinstance(source, tuple):  # already in memory: split it at 16 kHz
        wave, first = load_audio(source), True
        while len(wave):
            end = chunk_bounds(wave, SAMPLE_RATE, max_seconds)
            yield _tail(wave[:end], first, audio_name(source))
            wave, first = wave[end:], False
        return
    name = audio_name(source)
    if isinstance(source, bytes | bytearray):
        handle = io.BytesIO(source)
        if not source:
            raise InputError(f"{name} are empty (0 bytes); expected {ACCEPTED}")
    else:
        handle = path = local_path(source, "audio file")
        if not path.is_file():
            raise InputError(f"{name} does not exist or is not a file; expected {ACCEPTED}")
        if path.stat().st_size == 0:
            raise InputError(f"{name} is empty (0 bytes); expected {ACCEPTED}")
    try:
        f = soundfile.SoundFile(handle)
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise InputError(f"{name} cannot be read as audio ({e}); expected {ACCEPTED}") from None
    with f:
        rate, window = f.samplerate, math.floor(max_seconds * f.samplerate)
        carry = np.zeros((0, f.channels), dtype=np.float32)
        first = True
        while True:
            try:
                data = np.concatenate([carry, f.read(frames=window - len(carry), dtype="float32", always_2d=True)])
            except (soundfile.SoundFileError, RuntimeError) as e:
                raise InputError(f"{name} cannot be read as audio ({e}); expected {ACCEPTED}") from None
            if len(data) == 0:
                if first:
                    raise InputError(f"{name} has no samples (0 s of audio)")
                return
            at_end = len(data) < window or f.tell() >= f.frames
            end = len(data) if at_end else quiet_cut(data, rate)
            try:
                wave = load_audio((data[:end], rate))
            except InputError as e:
                raise InputError(f"{name}: {e}") from None
            yield _tail(wave, first, name)
            carry, first = data[end:], False
            if at_end:
                return
