"""The in-process espeak-ng binding (mm_llama/data/espeak.py): float32 speech at 22050 Hz, bit-identical to the
espeak-ng command line and the same whatever was synthesised before; rate, pitch, range and voice change what they
should; bad input is refused; faster than one espeak-ng process per sentence; usable from threads and forked workers.
Skipped where libespeak-ng is not installed (CI installs espeak-ng)."""

from __future__ import annotations

import _ctypes
import ctypes
import multiprocessing
import pickle
import shutil
import subprocess
import threading

import numpy as np
import pytest
import soundfile

from mm_llama.data import espeak
from mm_llama.data.espeak import Espeak, Voice, list_variants, list_voices
from mm_llama.errors import ConfigError, InputError

try:
    ENGINE = Espeak()
except InputError as e:
    pytest.skip(f"libespeak-ng cannot be loaded ({e}); CI installs espeak-ng", allow_module_level=True)

TEXT = "The red circle moves to the left."
SR = 22050
COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def command_line(tmp_path, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """int16 samples that `espeak-ng -w` writes."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("the espeak-ng command is not installed (apt-get install espeak-ng)")
    path = tmp_path / "cli.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(path), text], check=True,
                   capture_output=True, timeout=30)
    samples, rate_hz = soundfile.read(path, dtype="int16")
    assert rate_hz == SR and samples.ndim == 1
    return samples


def as_int16(wave: np.ndarray) -> np.ndarray:
    return (wave * 32768).astype(np.int16)  # exact: synth returns int16 / 32768


def f0_track(wave: np.ndarray, frame: int = 1024, hop: int = 256) -> np.ndarray:
    """Pitch in Hz of the voiced frames (RMS > 0.02, autocorrelation peak above half the energy), 60 to 400 Hz."""
    frames = np.stack([wave[s:s + frame] for s in range(0, len(wave) - frame, hop)]) * np.hanning(frame)
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames, 2 * frame)) ** 2)[:, :frame]  # (frames, lags)
    low, high = SR // 400, SR // 60
    lags = low + ac[:, low:high].argmax(axis=1)
    voiced = (np.sqrt((frames ** 2).mean(axis=1)) > 0.02) & (ac[np.arange(len(lags)), lags] > 0.5 * ac[:, 0])
    assert voiced.sum() >= 10
    return SR / lags[voiced]


def test_speech_is_float32_mono_22050_hz_of_a_sensible_length():
    wave = ENGINE.synth(TEXT)
    assert ENGINE.sample_rate == SR
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.5 < len(wave) / SR < 5
    assert np.abs(wave).max() <= 1
    assert np.sqrt(np.mean(wave ** 2)) > 0.05  # speech, not near-silence


def test_same_text_and_voice_give_the_same_samples_whatever_came_before():
    voice = Voice("en-us+f3")  # f3 breathes: it draws noise from libc's rand()
    first = ENGINE.synth(TEXT, voice)
    ENGINE.synth("She sells sea shells.", Voice("en-gb-scotland", rate=300, pitch=10))
    ENGINE.synth("Another sentence in between.", voice)
    assert np.array_equal(ENGINE.synth(TEXT, voice), first)


def test_the_process_rand_generator_is_left_as_it_was():
    libc = ctypes.CDLL(None)
    libc.srand(7)
    expected = [libc.rand() for _ in range(3)]
    libc.srand(7)
    ENGINE.synth(TEXT, Voice("en-us+f3"))
    assert [libc.rand() for _ in range(3)] == expected


@pytest.mark.parametrize("voice", [Voice(), Voice("en-gb-scotland", rate=120, pitch=30), Voice("en-us+f3", 300, 80)])
def test_equals_the_command_line_sample_for_sample(tmp_path, voice):
    expected = command_line(tmp_path, TEXT, voice.name, voice.rate, voice.pitch)
    wave = ENGINE.synth(TEXT, voice)
    assert len(wave) == len(expected)
    assert np.array_equal(as_int16(wave), expected)


def test_constants_match_the_loaded_library():
    with espeak._state.lock, espeak._fresh_library(espeak._library_name()) as (lib, sample_rate):
        assert sample_rate == SR
        defaults = {espeak._RATE: 175, espeak._VOLUME: 100, espeak._PITCH: 50, espeak._RANGE: 50}  # param_defaults
        assert {p: lib.espeak_GetParameter(p, 0) for p in defaults} == defaults
        for parameter, value in ((espeak._RATE, 123), (espeak._PITCH, 7), (espeak._RANGE, 91)):
            assert lib.espeak_SetParameter(parameter, value, 0) == espeak._EE_OK
            assert lib.espeak_GetParameter(parameter, 1) == value


def test_rate_changes_the_duration():
    slow, fast = (len(ENGINE.synth(TEXT, Voice(rate=rate))) for rate in (100, 300))
    assert slow / fast > 1.8  # measured 2.97


def test_pitch_moves_the_f0_and_range_widens_it():
    low, high = (np.median(f0_track(ENGINE.synth(TEXT, Voice(pitch=p)))) for p in (20, 80))
    assert high / low > 1.3  # measured 80 Hz -> 138 Hz
    flat, wide = (f0_track(ENGINE.synth(TEXT, Voice(pitch_range=r))) for r in (0, 99))
    spread = lambda f0: np.percentile(f0, 90) - np.percentile(f0, 10)
    assert spread(flat) < 0.25 * spread(wide)  # measured 1.9 Hz (monotone) against 41 Hz


def test_voices_differ():
    waves = {name: ENGINE.synth(TEXT, Voice(name)) for name in ("en-us", "en-gb-scotland", "en-us+f3")}
    names = list(waves)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(waves[a], waves[b]), (a, b)
    # the female variant speaks higher
    assert np.median(f0_track(waves["en-us+f3"])) > 1.3 * np.median(f0_track(waves["en-us"]))


def test_list_voices_gives_names_that_synthesize():
    english = list_voices("en")
    assert {"en", "en-us", "en-gb-scotland"} <= set(english) and english == sorted(english)
    for name in english:
        assert len(ENGINE.synth("Hello.", Voice(name))) > SR // 10, name
    british = list_voices("en-gb")
    assert "en-gb-scotland" in british and "en-us" not in british
    assert list_voices("zz") == []
    assert {"f3", "m1", "klatt", "whisper"} <= set(list_variants())
    with pytest.raises(InputError, match="list_voices takes a language code"):
        list_voices("en us")


@pytest.mark.parametrize("text, voice, words", [
    ("", Voice(), "empty text ''"),
    ("   ", Voice(), "whitespace-only text"),
    ("Left.\nRight.", Voice(), r"non-printable character '\\n' at index 5"),
    ("a\x00b", Voice(), r"non-printable character '\\x00' at index 1"),
    (b"bytes", Voice(), "takes text as a str, got bytes"),
    ("...", Voice(), "speaks nothing for text '...'"),
    (TEXT, Voice("xx-nonexistent"), "espeak-ng has no voice 'xx-nonexistent'.*list_voices"),
    (TEXT, Voice("en-us+f99"), "no voice variant 'f99'.*list_variants"),
    (TEXT, "en-us", "takes a Voice as voice, got str"),
])
def test_bad_synth_input_is_refused_clearly(text, voice, words):
    with pytest.raises(InputError, match=words):
        ENGINE.synth(text, voice)


@pytest.mark.parametrize("kwargs, words", [
    ({"rate": 10}, r"Voice.rate must be an int in \[80, 450\], got 10"),
    ({"rate": 175.0}, r"Voice.rate must be an int in \[80, 450\], got 175.0"),
    ({"pitch": 120}, r"Voice.pitch must be an int in \[0, 99\], got 120"),
    ({"pitch_range": -1}, r"Voice.pitch_range must be an int in \[0, 99\], got -1"),
    ({"pitch": True}, r"Voice.pitch must be an int in \[0, 99\], got True"),
    ({"name": ""}, "Voice.name must be an espeak-ng voice name such as 'en-us'.*got ''"),
    ({"name": "en-us+f3+f4"}, "at most one '\\+variant'"),
    ({"name": "x" * 40}, "1 to 39 printable ASCII characters"),
])
def test_bad_voice_is_refused_clearly(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        Voice(**kwargs)


def test_a_missing_library_says_how_to_install_it():
    with pytest.raises(InputError, match=r"cannot be loaded .*apt-get install espeak-ng"):
        espeak._library_info("libespeak-ng-missing.so.1")


def test_a_library_loaded_by_someone_else_is_refused():
    held = ctypes.CDLL(espeak._library_name())  # as another binding would
    try:
        with pytest.raises(InputError, match="already loaded in this process by something else"):
            ENGINE.synth(TEXT)
    finally:
        _ctypes.dlclose(held._handle)
    assert len(ENGINE.synth(TEXT)) > 0


def test_threads_get_their_own_utterances():
    jobs = [(f"The {color} star moves up.", Voice(name)) for color in COLORS[:3] for name in ("en-us", "en-us+f3")]
    expected = [ENGINE.synth(text, voice) for text, voice in jobs]
    results = [None] * len(jobs)

    def work(i):
        results[i] = ENGINE.synth(*jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(np.array_equal(r, e) for r, e in zip(results, expected, strict=True))


def test_pickles_for_spawned_workers():
    copy = pickle.loads(pickle.dumps(ENGINE))
    assert isinstance(copy, Espeak) and np.array_equal(copy.synth(TEXT), ENGINE.synth(TEXT))


def _synth_in_child(conn, text, voice):
    conn.send(ENGINE.synth(text, voice))
    conn.close()


def synth_in_forked_child(text: str, voice: Voice) -> np.ndarray:
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_synth_in_child, args=(send, text, voice))
    child.start()
    send.close()
    assert receive.poll(30), "the forked child gave no samples within 30 s"
    wave = receive.recv()
    child.join(timeout=30)
    assert child.exitcode == 0
    return wave


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gives_the_parents_samples():
    voice = Voice("en-us+f3", rate=150)
    parent = ENGINE.synth(TEXT, voice)
    assert np.array_equal(synth_in_forked_child(TEXT, voice), parent)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_while_another_thread_synthesizes_does_not_block_the_child():
    inside, release = threading.Event(), threading.Event()

    def hold_the_library():  # what a thread in the middle of `synth` holds
        with espeak._state.lock, espeak._fresh_library(espeak._library_name()):
            inside.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_library)
    holder.start()
    assert inside.wait(10)
    try:
        child = synth_in_forked_child(TEXT, Voice())
    finally:
        release.set()
        holder.join(timeout=30)
    assert np.array_equal(child, ENGINE.synth(TEXT))
