"""Speech synthesis in-process through the espeak-ng C library (libespeak-ng.so.1, Debian's `espeak-ng` package), for
the shapes world's speech data: thousands of short sentences in several voices, rates and pitches, without starting
one `espeak-ng` process per sentence.

    engine = Espeak()
    wave = engine.synth("The red circle moves to the left.", Voice("en-us+f3", rate=140, pitch=60))  # (n,) float32
    engine.sample_rate  # 22050

A fresh library per utterance. libespeak-ng keeps state from one utterance to the next (the phase of its pitch
flutter, its automatic gain; libc's `rand()` behind the breath noise of variants such as f3), so in one loaded library
the same text comes out different the second time (measured: a few samples longer or shorter, correlation ~0.4 with
the first). `synth` therefore loads the library, initialises it, speaks one utterance and unloads it (dlclose), with
libc's `rand()` started as in a new process (and the process's own generator put back after). Every utterance starts
from the state of a fresh `espeak-ng` process: the same (text, voice) gives the same samples whatever was synthesised
before and in any process, bit-identical to `espeak-ng -v NAME -s RATE -p PITCH -w out.wav TEXT`.

Cost (measured on 2 CPU cores, espeak-ng 1.51, a 1.5 s sentence): ~8.5 ms an utterance, of which ~2.5 ms is
synthesis, ~3 ms espeak-ng reading its voice list to resolve the name and ~2.5 ms loading, initialising and unloading
the library; an `espeak-ng -w` process takes ~15 ms. The dependencies libespeak-ng loads (libpcaudio, libasound, ...)
stay loaded between utterances. espeak-ng 1.51 never frees one array per initialisation (its voice list's index,
~2.7 KB): ~27 MB per 10 000 utterances in one process.

Samples: espeak-ng's int16 output / 32768 as float32, untrimmed: ~12 ms of digital silence first, espeak-ng's
end-of-sentence pause last (espeakENDPAUSE, ~0.3 s at 175 wpm), exactly as the command line writes them.

Threads and processes: the library is global to a process, so one lock serialises `synth` across threads and across
`Espeak` objects. After a fork (multiprocessing's 'fork' start method, DataLoader workers) the child gets a new lock
(an `os.register_at_fork` hook, not a lazy `os.getpid()` check: the parent's lock may have been held by another thread
at the fork, and two of the child's threads could race to replace it), and a library that another thread of the
parent had loaded at that moment is unloaded before the child's first utterance. Nothing else carries over, since
every utterance loads its own library. An `Espeak` pickles as a new `Espeak()`, so 'spawn' workers work too.

Constants: from espeak-ng's speak_lib.h at tag 1.51 (the header is not installed with the runtime package), checked
against the loaded library by the tests: the parameter defaults espeak_GetParameter reports (rate 175, volume 100,
pitch 50, range 50), durations that follow the rate, F0 that follows pitch and range, output equal to the command
line's.
"""
from __future__ import annotations

import _ctypes
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_int, c_short, c_size_t, c_ubyte, c_uint, c_void_p
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mm_llama.errors import ConfigError, InputError

# speak_lib.h (espeak-ng 1.51)
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: samples go to the synth callback before espeak_Synth returns
_INITIALIZE_DONT_EXIT = 0x8000  # espeak_Initialize options: return an error instead of exit(1) when data is missing
_BUFFER_MS = 0  # espeak_Initialize buflength: 0 = espeak-ng's default (as the command line)
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1  # espeak_Synth flags
_ENDPAUSE = 0x1000  # espeak_Synth flags: a sentence pause at the end, as the command line adds
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER
_EE_OK = 0  # espeak_ERROR

RATE_RANGE = (80, 450)  # words per minute: espeakRATE_MINIMUM, espeakRATE_MAXIMUM
PITCH_RANGE = (0, 99)  # espeakPITCH and espeakRANGE (50 is the voice's own)
MAX_NAME = 39  # espeak-ng copies a voice name into 40-byte buffers: a longer one would be cut to another voice's name
INSTALL_HINT = "install espeak-ng (Debian/Ubuntu: apt-get install espeak-ng)"
ACCEPTED_TEXT = ("printable text with at least one non-space character (letters, digits, punctuation and spaces; "
                 "no newlines, tabs or other control characters)")


@dataclass(frozen=True)
class Voice:
    """How `Espeak.synth` speaks.

    Args:
        name: an espeak-ng voice, as `espeak-ng -v` takes it: "en-us", "en", "en-gb-scotland" (see `list_voices`),
            optionally with a variant: "en-us+f3" (see `list_variants`).
        rate: words per minute, 80..450 (espeak-ng's default 175).
        pitch: base pitch, 0..99 (50 is the voice's own).
        pitch_range: pitch range, 0..99 (0 monotone, 50 the voice's own; espeakRANGE).
    """

    name: str = "en-us"
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50

    def __post_init__(self):
        name = self.name
        if (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isascii()
                or not name.isprintable() or name != name.strip() or name.count("+") > 1):
            raise ConfigError(f"Voice.name must be an espeak-ng voice name such as 'en-us', 'en-gb-scotland' or "
                              f"'en-us+f3' (1 to {MAX_NAME} printable ASCII characters, at most one '+variant', no "
                              f"leading or trailing spaces), got {name!r}")
        for field, (low, high) in (("rate", RATE_RANGE), ("pitch", PITCH_RANGE), ("pitch_range", PITCH_RANGE)):
            value = getattr(self, field)
            if not isinstance(value, Integral) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"Voice.{field} must be an int in [{low}, {high}], got {value!r}")

    @property
    def variant(self) -> str | None:
        """The variant after '+', or None."""
        return self.name.partition("+")[2] or None


class Espeak:
    """The espeak-ng synthesiser. Cheap to create: what it reads from the library is read once per process.

    Raises:
        InputError: libespeak-ng cannot be loaded or finds no espeak-ng data (espeak-ng is not installed).
    """

    def __init__(self):
        self._library = _library_name()
        self._info = _library_info(self._library)

    def __reduce__(self):
        return Espeak, ()

    @property
    def sample_rate(self) -> int:
        """The rate of `synth`'s samples in Hz (espeak-ng's 22050)."""
        return self._info.sample_rate

    @property
    def version(self) -> str:
        """The library's version, e.g. '1.51'."""
        return self._info.version

    def synth(self, text: str, voice: Voice = Voice()) -> np.ndarray:
        """Speak `text` in `voice`.

        Args:
            text: one or a few sentences of printable text (no control characters such as newlines).
            voice: the voice, rate and pitch.

        Returns:
            (n,) float32 mono waveform in [-1, 1) at `sample_rate`: the samples `espeak-ng -w` writes, / 32768.

        Raises:
            InputError: empty or whitespace-only text, a control character in it, text that gives no speech, or a
                voice or variant espeak-ng does not have.
        """
        _check_text(text)
        if not isinstance(voice, Voice):
            raise InputError(f"Espeak.synth takes a Voice as voice, got {type(voice).__name__}")
        if voice.variant is not None and voice.variant not in self._info.variants:
            raise InputError(f"espeak-ng has no voice variant {voice.variant!r} (in voice {voice.name!r}); "
                             f"expected one of list_variants(), e.g. 'f1'..'f5', 'm1'..'m7', 'klatt'")
        encoded = text.encode("utf-8")
        with _state.lock, _fresh_library(self._library) as (lib, _):
            status = lib.espeak_SetVoiceByName(voice.name.encode("ascii"))
            if status != _EE_OK:
                raise InputError(f"espeak-ng has no voice {voice.name!r} (espeak_SetVoiceByName returned {status}); "
                                 "expected a name from list_voices(language), e.g. 'en-us', 'en', 'en-gb-scotland'")
            for parameter, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.pitch_range)):
                status = lib.espeak_SetParameter(parameter, value, 0)
                if status != _EE_OK:
                    raise RuntimeError(f"espeak_SetParameter({parameter}, {value}) returned {status}")
            _state.chunks.clear()
            with _rand_seeded_as_new_process():
                status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE,
                                          None, None)
                if status == _EE_OK:
                    status = lib.espeak_Synchronize()
            if status != _EE_OK:
                raise RuntimeError(f"espeak_Synth returned {status} for text {text!r} in voice {voice}")
            samples = np.frombuffer(b"".join(_state.chunks), dtype=np.int16)
            _state.chunks.clear()
        if not samples.any():
            raise InputError(f"espeak-ng speaks nothing for text {text!r} (only silence); expected words to speak")
        return samples.astype(np.float32) / 32768


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise InputError(f"Espeak.synth takes text as a str, got {type(text).__name__}; expected {ACCEPTED_TEXT}")
    if not text.strip():
        raise InputError(f"Espeak.synth got {'empty' if not text else 'whitespace-only'} text {text!r}; "
                         f"expected {ACCEPTED_TEXT}")
    bad = next((i for i, c in enumerate(text) if not c.isprintable()), None)
    if bad is not None:
        raise InputError(f"Espeak.synth got text with the non-printable character {text[bad]!r} at index {bad} "
                         f"({text[:40]!r}); expected {ACCEPTED_TEXT}")


def list_voices(language: str = "en") -> list[str]:
    """The espeak-ng voices of a language, as `Voice.name` takes them.

    Args:
        language: a language code ("en", "de", ...) or a dialect ("en-gb"): voices for it or for a dialect of it.

    Returns:
        Sorted lower-case names such as "en", "en-gb-scotland", "en-us" (the voice files' names, which
        espeak_SetVoiceByName and `espeak-ng -v` accept); empty if espeak-ng has no voice for `language`.

    Raises:
        InputError: espeak-ng is not installed, or `language` is not a language code.
    """
    if not isinstance(language, str) or not language or not language.replace("-", "").isalnum():
        raise InputError(f"list_voices takes a language code such as 'en' or 'en-gb', got {language!r}")
    language = language.lower()
    info = _library_info(_library_name())
    return sorted(name for name, languages in info.voice_languages.items()
                  if any(lang == language or lang.startswith(language + "-") for lang in languages))


def list_variants() -> list[str]:
    """The voice variants espeak-ng has ("f3", "m1", "klatt", "whisper", ...), to append to a voice name after '+'.

    Raises:
        InputError: espeak-ng is not installed.
    """
    return sorted(_library_info(_library_name()).variants)


# ----------------------------------------------------------------------------------------------------------------------
# The library


class _VoiceStruct(ctypes.Structure):
    """speak_lib.h's espeak_VOICE."""

    _fields_ = [("name", c_char_p), ("languages", c_void_p), ("identifier", c_char_p), ("gender", c_ubyte),
                ("age", c_ubyte), ("variant", c_ubyte), ("xx1", c_ubyte), ("score", c_int), ("spare", c_void_p)]


_SynthCallback = CFUNCTYPE(c_int, POINTER(c_short), c_int, c_void_p)


class _State:
    """What the process shares: the lock around the library, the samples of the utterance being synthesised, the
    callback that collects them (kept here so it is never garbage-collected while a library may call it), and the
    handle of a library that is loaded right now."""

    def __init__(self):
        self.lock = threading.Lock()
        self.chunks: list[bytes] = []
        self.callback = _SynthCallback(self._collect)
        self.handle: int | None = None
        self.stale_handle: int | None = None
        self.dependencies_pinned = False
        self.pinned: list[int] = []  # handles of libespeak-ng's dependencies, see `_pin_dependencies`

    def _collect(self, wav, n: int, events) -> int:
        if wav and n > 0:
            self.chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0 = go on


_state = _State()


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at the fork: it will never release it in this process. A library it had
    # loaded is mid-utterance here; unload it before the first utterance so that the next load is a fresh one.
    _state.lock = threading.Lock()
    if _state.handle is not None:
        _state.stale_handle, _state.handle = _state.handle, None


os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def _library_name() -> str:
    """What to dlopen: the name ctypes finds for espeak-ng, else the soname."""
    return ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"


_FUNCTIONS = {  # the signatures in speak_lib.h of the functions used
    "espeak_Initialize": CFUNCTYPE(c_int, c_int, c_int, c_char_p, c_int),
    "espeak_SetSynthCallback": CFUNCTYPE(None, _SynthCallback),
    "espeak_SetVoiceByName": CFUNCTYPE(c_int, c_char_p),
    "espeak_SetParameter": CFUNCTYPE(c_int, c_int, c_int, c_int),
    "espeak_GetParameter": CFUNCTYPE(c_int, c_int, c_int),
    "espeak_Synth": CFUNCTYPE(c_int, c_char_p, c_size_t, c_uint, c_int, c_uint, c_uint, c_void_p, c_void_p),
    "espeak_Synchronize": CFUNCTYPE(c_int),
    "espeak_Terminate": CFUNCTYPE(c_int),
    "espeak_ListVoices": CFUNCTYPE(POINTER(POINTER(_VoiceStruct)), POINTER(_VoiceStruct)),
    "espeak_Info": CFUNCTYPE(c_char_p, POINTER(c_char_p)),
}
# ctypes.CDLL builds a class per load (~1 ms); the utterance loop uses ctypes' own dlopen/dlsym/dlclose instead.
_LOAD = os.RTLD_LAZY | os.RTLD_LOCAL


@contextmanager
def _fresh_library(name: str) -> Iterator[tuple[SimpleNamespace, int]]:
    """(a newly loaded and initialised libespeak-ng: its functions by name, its sample rate), unloaded on exit. The
    caller holds `_state.lock`."""
    if _state.stale_handle is not None:
        _ctypes.dlclose(_state.stale_handle)
        _state.stale_handle = None
    try:
        held = _ctypes.dlopen(name, _LOAD | os.RTLD_NOLOAD)  # loads nothing: a handle only if it is loaded already
    except OSError:
        pass  # not loaded: the load below is a fresh instance
    else:
        _ctypes.dlclose(held)
        raise InputError(f"{name} is already loaded in this process by something else (another espeak-ng binding?): "
                         "Espeak loads a fresh library for every utterance and cannot share one")
    if not _state.dependencies_pinned:
        _pin_dependencies(name)
    try:
        handle = _ctypes.dlopen(name, _LOAD)
    except OSError as e:
        raise InputError(f"the espeak-ng library ({name}) cannot be loaded ({e}); {INSTALL_HINT}") from e
    _state.handle = handle
    try:
        lib = SimpleNamespace(**{f: prototype(_ctypes.dlsym(handle, f)) for f, prototype in _FUNCTIONS.items()})
        sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, None, _INITIALIZE_DONT_EXIT)
        if sample_rate <= 0:
            raise InputError(f"the espeak-ng library ({name}) finds no espeak-ng data (espeak_Initialize returned "
                             f"{sample_rate}); {INSTALL_HINT}")
        lib.espeak_SetSynthCallback(_state.callback)
        try:
            yield lib, sample_rate
        finally:
            lib.espeak_Terminate()  # frees its data and stops its (idle) command thread: nothing runs in it any more
    finally:
        _state.handle = None
        _ctypes.dlclose(handle)


def _pin_dependencies(name: str) -> None:
    """Keep the shared objects that libespeak-ng loads (libpcaudio, libasound, libsonic, ...) loaded for good, so that
    unloading libespeak-ng between utterances does not unload and reload them too (~0.7 ms an utterance). They hold
    no espeak-ng state. Linux: the new objects are read from /proc/self/maps; elsewhere nothing is pinned."""
    _state.dependencies_pinned = True
    try:
        before = _mapped_objects()
        handle = _ctypes.dlopen(name, _LOAD)
    except OSError:
        return  # no /proc, or no library: `_fresh_library` says what is missing
    try:
        itself = _mapped_objects(containing=_ctypes.dlsym(handle, "espeak_Initialize"))
        for path in sorted(_mapped_objects() - before - itself):
            try:
                _state.pinned.append(_ctypes.dlopen(path, _LOAD | os.RTLD_NOLOAD))
            except OSError:
                pass  # not a loaded shared object (a file mapped for another reason)
    finally:
        _ctypes.dlclose(handle)


def _mapped_objects(containing: int | None = None) -> set[str]:
    """The files mapped into this process (or the one mapped at address `containing`), from /proc/self/maps."""
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)  # start-end perms offset dev inode path
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if containing is None or start <= containing < end:
                    paths.add(fields[5].rstrip("\n"))
    return paths


_libc = ctypes.CDLL(None)
_libc.initstate.argtypes = [c_uint, c_char_p, c_size_t]
_libc.initstate.restype = c_void_p
_libc.setstate.argtypes = [c_void_p]
_libc.setstate.restype = c_void_p
_RAND_STATE = ctypes.create_string_buffer(128)  # glibc's default generator (TYPE_3): 128 bytes of state


@contextmanager
def _rand_seeded_as_new_process() -> Iterator[None]:
    """libc's rand() (espeak-ng's noise) as a new process starts it, and the process's own generator back after.

    glibc starts rand() as initstate(1, state, 128); the caller's state array is set aside, not changed."""
    previous = _libc.initstate(1, _RAND_STATE, len(_RAND_STATE))
    try:
        yield
    finally:
        _libc.setstate(previous)


@dataclass(frozen=True)
class _LibraryInfo:
    sample_rate: int
    version: str
    voice_languages: dict[str, tuple[str, ...]]  # lower-case voice file name -> its languages
    variants: frozenset[str]


@functools.cache
def _library_info(name: str) -> _LibraryInfo:
    """Sample rate, version, voices and variants of the library, read once per process."""
    with _state.lock, _fresh_library(name) as (lib, sample_rate):
        data_path = c_char_p()
        version = lib.espeak_Info(ctypes.byref(data_path)).decode()
        variants_dir = Path(data_path.value.decode()) / "voices" / "!v"  # decoded now: the library's memory goes
        voice_languages, voices, i = {}, lib.espeak_ListVoices(None), 0  # all but variants and mbrola voices
        while voices[i]:  # a NULL-terminated array
            v = voices[i].contents
            voice_languages[v.identifier.decode().rsplit("/", 1)[-1].lower()] = _languages(v.languages)
            i += 1
    # A variant is a file that espeak_SetVoiceByName looks for in voices/!v/, and silently goes without if missing.
    variants = frozenset()
    if variants_dir.is_dir():
        variants = frozenset(path.name for path in variants_dir.iterdir() if path.is_file())
    return _LibraryInfo(sample_rate, version, voice_languages, variants)


def _languages(pointer: int) -> tuple[str, ...]:
    """An espeak_VOICE's `languages`: (priority byte, name, NUL) repeated, ended by a NUL where a priority would be."""
    names, offset = [], 0
    while ctypes.string_at(pointer + offset, 1) != b"\0":
        name = ctypes.string_at(pointer + offset + 1)
        names.append(name.decode().lower())
        offset += len(name) + 2
    return tuple(names)
