"""Audio loading and log-mel features (Llama 3 paper §8): frame counts, batch invariance, resampling, channels,
parity with torchaudio's MelSpectrogram, bad input, and real speech from espeak-ng."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from encoders.audio import HOP, N_MELS, SAMPLE_RATE, WINDOW, load_audio, log_mel, normalize
from mm_llama.errors import InputError


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(n: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("n", [160, 161, 319, 320, 12345, 16000, 16001])
def test_frame_count_is_samples_over_hop(n):
    features, frame_lengths = log_mel(noise(n, seed=n))
    assert features.shape == (1, n // HOP, N_MELS) and features.dtype == torch.float32
    assert frame_lengths.tolist() == [n // HOP] and frame_lengths.dtype == torch.long
    assert torch.isfinite(features).all()


def test_ten_ms_gives_one_frame_and_less_is_refused():
    assert log_mel(noise(160, seed=0))[0].shape == (1, 1, N_MELS)
    with pytest.raises(InputError, match="159 samples, shorter than 10 ms"):
        log_mel(noise(159, seed=0))
    with pytest.raises(InputError, match="audio 1 of the batch has 100 samples, shorter than 10 ms"):
        log_mel(torch.zeros(2, 1000), torch.tensor([1000, 100]))


def test_features_match_torchaudio_melspectrogram():
    # Our framing is torchaudio's center=False MelSpectrogram on the waveform padded with WINDOW - HOP zeros.
    wave = noise(5000, seed=1)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=WINDOW, win_length=WINDOW,
                                               hop_length=HOP, n_mels=N_MELS, center=False, power=2.0)
    expected = torch.log(mel(torch.nn.functional.pad(wave, (0, WINDOW - HOP))).clamp(min=1e-10)).T  # (T, 80)
    features, _ = log_mel(wave)
    assert expected.shape == features[0].shape == (31, N_MELS)
    torch.testing.assert_close(features[0], expected, atol=1e-4, rtol=0)


def test_an_utterance_is_the_same_alone_and_batched_with_a_longer_louder_one():
    short = torch.from_numpy(sine(440, 0.77, SAMPLE_RATE, amplitude=0.3)) + noise(12320, seed=2, scale=0.01)
    n_short, n_long = 12301, 20011
    short = short[:n_short]
    long = noise(n_long, seed=3, scale=3.0)
    # The short one's padding is loud noise, not zeros: none of it may reach its features.
    batch = torch.stack([torch.cat([short, noise(n_long - n_short, seed=4, scale=5.0)]), long])  # (2, n_long)
    alone, alone_lengths = log_mel(short)
    batched, lengths = log_mel(batch, torch.tensor([n_short, n_long]))
    T = n_short // HOP
    assert lengths.tolist() == [T, n_long // HOP] and batched.shape == (2, n_long // HOP, N_MELS)
    assert (alone[0] - batched[0, :T]).abs().max() <= 1e-5
    assert (batched[0, T:] == 0).all()
    alone_norm, batched_norm = normalize(alone, alone_lengths), normalize(batched, lengths)
    assert (alone_norm[0] - batched_norm[0, :T]).abs().max() <= 1e-5
    assert (batched_norm[0, T:] == 0).all()
    # Normalised over its own frames: each channel has mean 0 and variance var / (var + 1e-5) (1 but for the epsilon).
    valid, raw_var = batched_norm[0, :T].double(), alone[0].double().var(0, unbiased=False)
    assert valid.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(valid.var(0, unbiased=False), raw_var / (raw_var + 1e-5), atol=1e-5, rtol=0)


def test_silence_gives_the_log_floor_then_zeros():
    features, frame_lengths = log_mel(torch.zeros(1600))
    assert features.shape == (1, 10, N_MELS)
    torch.testing.assert_close(features, torch.full_like(features, math.log(1e-10)), atol=1e-5, rtol=0)
    assert (normalize(features, frame_lengths) == 0).all()


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_resampling_keeps_the_length_and_the_pitch(tmp_path, rate):
    seconds = 0.5
    path = tmp_path / f"tone_{rate}.wav"
    soundfile.write(path, sine(440, seconds, rate), rate, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(len(wave) - round(seconds * SAMPLE_RATE)) <= 1
    native = torch.from_numpy(sine(440, seconds, SAMPLE_RATE))
    n = min(len(wave), len(native))
    # Away from the ends (the sinc filter sees zeros past them), the resampled tone is the 16 kHz tone.
    assert (wave[200:n - 200] - native[200:n - 200]).abs().max() < 2e-3
    peak = log_mel(wave)[0][0].mean(0).argmax()
    assert peak == log_mel(native)[0][0].mean(0).argmax()


def test_stereo_is_mixed_down_by_the_mean(tmp_path):
    tone = sine(440, 0.25, SAMPLE_RATE)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([tone, np.zeros_like(tone)], axis=1), SAMPLE_RATE)  # PCM_16: quantised to 3e-5
    wave = load_audio(path)
    assert wave.shape == (len(tone),)
    assert (wave - torch.from_numpy(tone) / 2).abs().max() < 1e-4


def test_a_tuple_equals_the_file_of_the_same_samples(tmp_path):
    samples = np.stack([sine(300, 0.3, 22050), sine(700, 0.3, 22050, amplitude=0.2)], axis=1)  # (n, 2)
    path = tmp_path / "two.flac"
    soundfile.write(path, samples, 22050, subtype="PCM_24")
    read, _ = soundfile.read(path, dtype="float32", always_2d=True)
    from_file = load_audio(str(path))
    assert torch.equal(from_file, load_audio((read, 22050)))
    assert torch.equal(from_file, load_audio((torch.from_numpy(read), 22050)))
    assert len(from_file) == round(0.3 * SAMPLE_RATE)
    mono = sine(440, 0.1, SAMPLE_RATE)
    assert torch.equal(load_audio((mono, SAMPLE_RATE)), torch.from_numpy(mono))  # (n,) at the rate: untouched


def test_max_seconds(tmp_path):
    path = tmp_path / "two_seconds.wav"
    soundfile.write(path, sine(440, 2.0, 8000), 8000)
    assert len(load_audio(path, max_seconds=2.0)) == 2 * SAMPLE_RATE
    with pytest.raises(InputError, match=r"two_seconds.wav is 2.000 s long, more than the limit of 1.5 s"):
        load_audio(path, max_seconds=1.5)
    with pytest.raises(InputError, match=r"tuple is 2.000 s long, more than the limit of 1 s \(max_seconds\)"):
        load_audio((sine(440, 2.0, 8000), 8000), max_seconds=1)


def write_bad(tmp_path, kind: str):
    """A bad file of each kind, and the words its error must contain."""
    path = tmp_path / f"{kind}.wav"
    if kind == "missing":
        return path, r"missing.wav does not exist or is not a file; expected an audio file: WAV, FLAC"
    if kind == "directory":
        path.mkdir()
        return path, r"directory.wav does not exist or is not a file"
    if kind == "empty":
        path.write_bytes(b"")
        return path, r"empty.wav is empty \(0 bytes\)"
    if kind == "text":
        path.write_text("this is not audio\n" * 20)
        return path, r"text.wav cannot be read as audio \(.*Format not recognised.*\); expected .*WAV, FLAC, OGG"
    if kind == "no_samples":
        soundfile.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
        return path, r"no_samples.wav has no samples"
    if kind == "nan":
        samples = sine(440, 0.1, SAMPLE_RATE)
        samples[[10, 20, 30]] = np.nan
        soundfile.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
        return path, r"nan.wav has 3 non-finite samples of 1600 \(3 NaN, 0 infinite\)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "no_samples", "nan"])
def test_a_bad_file_is_refused_by_name(tmp_path, kind):
    path, words = write_bad(tmp_path, kind)
    with pytest.raises(InputError, match=words):
        load_audio(path)


def test_bad_tuples_and_urls_are_refused():
    tone = sine(440, 0.1, SAMPLE_RATE)
    with_inf = tone.copy()
    with_inf[[1, 2]] = [np.inf, -np.inf]
    cases = [
        ((with_inf, SAMPLE_RATE), r"tuple has 2 non-finite samples of 1600 \(0 NaN, 2 infinite\)"),
        ((tone, 0), r"tuple has sample rate 0; expected .*positive int sample rate"),
        ((tone, 16000.5), r"tuple has sample rate 16000.5"),
        ((tone, True), r"tuple has sample rate True"),
        ((tone,), r"tuple has 1 items"),
        (((tone * 32767).astype(np.int16), SAMPLE_RATE), r"dtype int16.*integer PCM"),
        (([0.0, 0.1], SAMPLE_RATE), r"waveform of type list"),
        ((np.stack([tone, tone]), SAMPLE_RATE), r"shape \(2, 1600\).*pass waveform.T"),
        ((np.zeros((0,), np.float32), SAMPLE_RATE), r"tuple has no samples"),
        ((tone, 44101), r"sample rate of 44101 Hz, which cannot be resampled to 16000 Hz"),
        ("https://example.com/speech.wav", r"audio file https://example.com/speech.wav: URLs are not fetched"),
        ("http://example.com/a.flac", r"URLs are not fetched"),
    ]
    for source, words in cases:
        with pytest.raises(InputError, match=words):
            load_audio(source)


def test_real_speech_from_espeak(tmp_path):
    path = tmp_path / "circle.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "The circle is red."], check=True, capture_output=True, timeout=30)
    info = soundfile.info(path)
    assert info.samplerate == 22050 and info.channels == 1
    wave = load_audio(path, max_seconds=10)
    assert abs(len(wave) - info.frames * SAMPLE_RATE / 22050) <= 1
    features, frame_lengths = log_mel(wave)
    T = len(wave) // HOP
    assert features.shape == (1, T, N_MELS) and frame_lengths.tolist() == [T] and T > 50
    assert torch.isfinite(features).all()
    assert features[0].std(dim=0).mean() > 1  # speech and pauses: the spectrum changes over time
    normalised = normalize(features, frame_lengths)
    assert torch.isfinite(normalised).all() and normalised[0].mean(0).abs().max() < 1e-4
