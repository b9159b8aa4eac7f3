"""Shapes-world speech (issue 12): espeak-ng reading the world's questions and captions in many voices, as speech
shards for `speech-pretrain` and the speech-adapter stage's recognition and spoken-dialogue tasks.

Half the samples (SPOKEN_QA_SHARE) are spoken questions about a picture, for the `dialogue` task (the Llama 3 paper's
spoken dialogue: no system prompt, the user turn is speech, the assistant answers) and the evaluation's `spoken-qa`:
the question as 16 kHz mono FLAC (`flac`), the picture (`png`, DEFAULT_SIZE), its transcript (`txt`) and the answer
(`json`), e.g.
    flac  2.3 s: "Which colour is the small star?" in en+f1 at 143 words/min, pitch 46
    png   84 x 84: a small green star at the bottom, on white
    txt   Which colour is the small star?
    json  {"task": "dialogue", "language": "English", "kind": "question", "question": "Which colour is the small star?",
           "answer": "It is green.", "type": "colour", "voice": {"name": "en+f1", ...}}
Question types are drawn uniformly (QUESTION_TYPES). The others are recognition samples: the utterance (`flac`), its
transcript (`txt`) and what it is (`json`: the task "asr", the language "English", whether it is a question or a
caption, and the voice), e.g.
    flac  1.9 s: "Where is the big red circle?" in en-gb-scotland+f3 at 152 words/min, pitch 61
    txt   Where is the big red circle?
    json  {"task": "asr", "language": "English", "kind": "question", "voice": {"name": "en-gb-scotland+f3", ...}}

Voices: the training split draws a voice from TRAIN_VOICES (7 English accents x 24 variants) at a rate of 130-210
words/min, a pitch of 30-70 and a pitch range of 30-70; the held-out split speaks in HELDOUT_VOICE only, an accent and
a variant no training sample has, at its own rate and pitch. Scenes and sentences follow the world's splits (a held-out
sample's scene and sentence never occur in training). espeak-ng runs in-process (`mm_llama.data.espeak`): the same
seed gives the same shards, byte for byte, whatever `workers` is.
"""

from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path
from typing import NamedTuple

import soundfile
import torch
from PIL import Image

from encoders.audio import SAMPLE_RATE, load_audio
from mm_llama.data.espeak import Espeak, Voice
from mm_llama.data.pack import write_shards
from mm_llama.data.synth_parallel import parallel_samples
from mm_llama.data.world import check_split, random_scene
from mm_llama.data.world_draw import DEFAULT_SIZE, draw_scene
from mm_llama.data.world_language import image_question, scene_sentence
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.errors import InputError

__all__ = ["HELDOUT_VOICE", "SPOKEN_QA_SHARE", "SpokenQuestion", "SpokenSentence", "TRAIN_VOICES", "speech_sample",
           "spoken_question", "spoken_sentence", "synth_speech", "voice_for"]

_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us-nyc", "en-gb-x-gbclan")
# espeak-ng's voice variants: its male and female ones (f2 is held out), the klatt synthesisers and the named ones.
# Spoken QA on held-out voices rose with the number of training voices (42 -> 168: 89.4 -> 90.1 %, session 11).
_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+m8", "+f1", "+f3", "+f4", "+f5", "+klatt",
             "+klatt2", "+klatt3", "+Alex", "+Annie", "+adam", "+belinda", "+david", "+linda", "+steph", "+travis")
TRAIN_VOICES = tuple(accent + variant for accent in _ACCENTS for variant in _VARIANTS)
# Never in training: another accent (West Midlands), another variant (f2), its own rate and pitch.
HELDOUT_VOICE = Voice("en-gb-x-gbcwmd+f2", rate=165, pitch=45, pitch_range=55)
# Of the samples, the share that are spoken questions about a picture (the others: recognition).
SPOKEN_QA_SHARE = 0.5


class SpokenQuestion(NamedTuple):
    """A picture, a question about it spoken (`wave`: (n,) float32 at 16 kHz) in `voice`, its transcript, the answer
    and the question's type (in QUESTION_TYPES)."""

    image: Image.Image
    wave: torch.Tensor
    question: str
    answer: str
    qtype: str
    voice: Voice


@functools.cache
def _engine() -> Espeak:
    return Espeak()


def voice_for(rng: random.Random, split: str) -> Voice:
    """A training voice setting drawn from `rng`, or the held-out one."""
    if split == "heldout":
        return HELDOUT_VOICE
    return Voice(rng.choice(TRAIN_VOICES), rate=rng.randint(130, 210), pitch=rng.randint(30, 70),
                 pitch_range=rng.randint(30, 70))


def _speak(text: str, voice: Voice) -> torch.Tensor:
    """`text` spoken in `voice`: (n,) float32 at 16 kHz."""
    engine = _engine()
    return load_audio((engine.synth(text, voice), engine.sample_rate), sample_rate=SAMPLE_RATE)


def spoken_question(rng: random.Random, split: str = "train", qtype: str | None = None) -> SpokenQuestion:
    """A random scene of `split`, drawn, with a question about it spoken in a voice of `split` (`voice_for`).

    Args:
        rng: the random source; the same state gives the same picture and wave.
        split: "train" or "heldout" (the held-out scene, question and voice).
        qtype: one of QUESTION_TYPES; None draws one uniformly among those the scene allows.
    Returns:
        the SpokenQuestion; `InputError` when the scene has no question of that type in `split` (draw again).
    """
    scene = random_scene(rng, split)
    qa = image_question(scene, rng, split, qtype)
    image = draw_scene(scene, DEFAULT_SIZE, rng)
    voice = voice_for(rng, split)
    return SpokenQuestion(image, _speak(qa.question, voice), qa.question, qa.answer, qa.qtype, voice)


class SpokenSentence(NamedTuple):
    """A question or caption about a random scene (`kind`), spoken (`wave`: (n,) float32 at 16 kHz) in `voice`."""

    text: str
    wave: torch.Tensor
    kind: str
    voice: Voice


def spoken_sentence(rng: random.Random, split: str = "train", kind: str | None = None) -> SpokenSentence:
    """A question or caption (`kind`; None draws one) about a random scene of `split`, spoken in a voice of `split`:
    a recognition sample (the evaluation's `asr` task takes held-out ones)."""
    text, kind = scene_sentence(rng, split, kind)
    voice = voice_for(rng, split)
    return SpokenSentence(text, _speak(text, voice), kind, voice)


def speech_sample(rng: random.Random, split: str = "train") -> dict[str, bytes]:
    """One sample as shard members: a spoken question about a picture ({"flac", "png", "txt", "json"}, task
    "dialogue") with probability SPOKEN_QA_SHARE, else a question about a random scene or one of its captions, spoken
    ({"flac", "txt", "json"}, task "asr")."""
    check_split(split)  # said here: the retries below would take a bad split's InputError for a scene to redraw
    members, record = {}, {"task": "asr", "language": "English", "kind": "question"}
    if rng.random() < SPOKEN_QA_SHARE:
        while True:  # a scene with no question in the split (rare in "heldout"): draw another
            try:
                spoken = spoken_question(rng, split)
                break
            except InputError:
                continue
        text, wave, voice = spoken.question, spoken.wave, spoken.voice
        png = io.BytesIO()
        spoken.image.save(png, format="PNG")
        members["png"] = png.getvalue()
        record |= {"task": "dialogue", "question": text, "answer": spoken.answer, "type": spoken.qtype}
    else:
        sentence = spoken_sentence(rng, split)
        text, wave, voice = sentence.text, sentence.wave, sentence.voice
        record["kind"] = sentence.kind
    flac = io.BytesIO()
    soundfile.write(flac, wave.numpy(), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    record["voice"] = {"name": voice.name, "rate": voice.rate, "pitch": voice.pitch, "pitch_range": voice.pitch_range}
    return {"flac": flac.getvalue(), **members, "txt": text.encode("ascii"), "json": json.dumps(record).encode("ascii")}


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
