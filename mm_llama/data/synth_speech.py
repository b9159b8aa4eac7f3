"""Shapes-world speech (issue 12): espeak-ng reading the world's questions and captions in many voices, as speech
shards for `speech-pretrain` and the speech-adapter stage's recognition task.

Each sample is the utterance as 16 kHz mono FLAC (`flac`), its transcript (`txt`) and what it is (`json`: the task
"asr", the language "English", whether it is a question or a caption, and the voice), e.g.
    flac  1.9 s: "Where is the big red circle?" in en-gb-scotland+f3 at 152 words/min, pitch 61
    txt   Where is the big red circle?
    json  {"task": "asr", "language": "English", "kind": "question", "voice": {"name": "en-gb-scotland+f3", ...}}

Voices: the training split draws a voice from TRAIN_VOICES (6 English accents x 7 variants) at a rate of 130-210
words/min, a pitch of 30-70 and a pitch range of 30-70; the held-out split speaks in HELDOUT_VOICE only, an accent and
a variant no training sample has, at its own rate and pitch. Sentences follow the world's splits (a held-out sample's
scene and sentence never occur in training). espeak-ng runs in-process (`mm_llama.data.espeak`): the same seed gives
the same shards, byte for byte, whatever `workers` is.
"""

from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

import soundfile

from encoders.audio import SAMPLE_RATE, load_audio
from mm_llama.data.espeak import Espeak, Voice
from mm_llama.data.pack import write_shards
from mm_llama.data.synth_parallel import parallel_samples
from mm_llama.data.world import check_split, random_scene
from mm_llama.data.world_language import caption, image_question
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.errors import InputError

__all__ = ["HELDOUT_VOICE", "TRAIN_VOICES", "speech_sample", "synth_speech", "voice_for"]

_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us-nyc")
_VARIANTS = ("", "+m1", "+m3", "+m7", "+f1", "+f3", "+f4")
TRAIN_VOICES = tuple(accent + variant for accent in _ACCENTS for variant in _VARIANTS)
# Never in training: another accent (West Midlands), another variant (f2), its own rate and pitch.
HELDOUT_VOICE = Voice("en-gb-x-gbcwmd+f2", rate=165, pitch=45, pitch_range=55)


@functools.cache
def _engine() -> Espeak:
    return Espeak()


def voice_for(rng: random.Random, split: str) -> Voice:
    """A training voice setting drawn from `rng`, or the held-out one."""
    if split == "heldout":
        return HELDOUT_VOICE
    return Voice(rng.choice(TRAIN_VOICES), rate=rng.randint(130, 210), pitch=rng.randint(30, 70),
                 pitch_range=rng.randint(30, 70))


def speech_sample(rng: random.Random, split: str = "train") -> dict[str, bytes]:
    """One utterance: a question about a random scene or one of its captions, spoken, as shard members."""
    kind = rng.choice(("question", "caption"))
    while True:  # a scene with no sentence of this kind in the split (rare in "heldout"): draw another
        scene = random_scene(rng, split)
        try:
            text = image_question(scene, rng, split).question if kind == "question" else caption(scene, rng, split)
            break
        except InputError:
            continue
    voice = voice_for(rng, split)
    engine = _engine()
    wave = load_audio((engine.synth(text, voice), engine.sample_rate), sample_rate=SAMPLE_RATE)
    flac = io.BytesIO()
    soundfile.write(flac, wave.numpy(), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    record = {"task": "asr", "language": "English", "kind": kind,
              "voice": {"name": voice.name, "rate": voice.rate, "pitch": voice.pitch, "pitch_range": voice.pitch_range}}
    return {"flac": flac.getvalue(), "txt": text.encode("ascii"), "json": json.dumps(record).encode("ascii")}


def synth_speech(out: Path, n: int, *, seed: int = 0, split: str = "train", shard_size: int = 1000,
                 workers: int | None = None) -> list[Path]:
    """Write `n` spoken shapes-world sentences as webdataset shards (`out/speech-000000.tar`, …), plus the world's
    tokenizer (`out/tokenizer.model`, for the transcripts).

    Args:
        out: output folder.
        n: number of utterances.
        seed: the same seed gives the same shards, byte for byte, whatever `workers` is (with the same espeak-ng).
        split: "train" (training voices, scenes and sentences) or "heldout" (the held-out voice, scenes, sentences).
        shard_size: samples per shard.
        workers: processes making the samples (None: the usable cores, at most 16).
    Returns:
        the shard paths.
    """
    check_split(split)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    _engine()  # a missing espeak-ng is said before any work
    samples = parallel_samples(functools.partial(speech_sample, split=split), n, seed=seed, workers=workers)
    paths = write_shards(Path(out), "speech", samples, shard_size=shard_size, total=n, desc="synth speech")
    write_world_tokenizer(Path(out) / "tokenizer.model")
    return paths
