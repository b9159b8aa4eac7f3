"""Evaluation tasks: deterministic held-out questions with exact answers, grouped in suites.

A task is a name, the medium the model needs for it, and a generator of `EvalItem`s from the held-out split of the
shapes world (`mm_llama.data.world`: no scene or sentence of it was trained on), balanced over its question types.
Answers are a function of the question and the scene (or clip), so grading is an exact match. A medium adds its
tasks to `SUITES["shapes"]`, a line to `MEDIA` and a field to `EvalItem`; the runner does not change.

    text-qa    the trunk's language (stage lm): a caption, then a question about it, in one user message
                   "There is a big red circle at the top left. Where is the circle?" -> "The circle is at the top left."
    image-qa   the image stage: the drawn scene and the question alone
    video-qa   the video stage: a rendered clip and a question that needs time, one a model blind to the order of
               the frames answers at chance (`world_time`: "Which way does the triangle move?", "What colour is the
               circle at the end?" when it changes colour); the report's chance column is that model's accuracy
    video-qa-shuffled  the same clips and questions, the clip cut to the 16 frames the sampler takes, in a shuffled
               order: a model that reads time falls to chance or below here (a false order gives false answers:
               the shipped model scores 35 % against a chance of 50 %), while one that reads a bag of frames could
               not have beaten chance on video-qa
    asr        the speech stages: a held-out question or caption spoken in the held-out voice (an accent, variant,
               rate and pitch no training sample has), transcribed with the paper's prompt "Repeat after me in
               English:"; graded by word error rate (`mm_llama.evaluation.wer`) as well as exact sentences
    spoken-qa  the drawn scene and the question spoken in the held-out voice, no text: "which shape is at the top?"
               heard, not read
"""

from __future__ import annotations

import functools
import hashlib
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mm_llama.data.world import Scene, random_scene
from mm_llama.data.world_clips import Clip, random_clip
from mm_llama.data.world_draw import DEFAULT_SIZE, draw_scene
from mm_llama.data.world_language import QUESTION_TYPES, caption, image_question
from mm_llama.data.world_time import TIME_QUESTION_TYPES, time_question
from mm_llama.errors import InputError
from mm_llama.speech_prompts import system_prompt

__all__ = ["MEDIA", "SUITES", "EvalItem", "Task", "suite_tasks"]


@dataclass(frozen=True)
class EvalItem:
    """One question: what the user sends (text, and an image, a video file or nothing), the one right answer, and
    the scene asked about (a clip's start scene). `media()` gives the item's media as `Assistant.ask` takes them."""

    task: str
    qtype: str
    question: str
    answer: str
    scene: Scene | None
    image: Image.Image | None = None
    video: Path | None = None
    clip: Clip | None = None  # what the video shows (video items)
    chance: float | None = None  # the expected accuracy of a model blind to what the task tests (video: to order)
    audio: tuple | None = None  # (waveform, sample_rate): the question or sentence spoken; then no text is sent
    system: str | None = None  # the system prompt it is asked with
    metric: str = "exact"  # "exact": the answer must equal `answer`; "wer": also counted in word errors

    @property
    def text(self) -> str | None:
        """What is sent as text: the question, unless it is spoken."""
        return None if self.audio is not None else self.question

    def media(self) -> dict:
        """The media keyword arguments of `Assistant.ask` for this item: {} for text alone, {"image": ...},
        {"video": ...}, {"audio": ...}."""
        return {kind: value for kind, value in (("image", self.image), ("video", self.video), ("audio", self.audio))
                if value is not None}


@dataclass(frozen=True)
class Task:
    """name; medium: what the model needs (a key of `MEDIA`: "text", "image", "video"); types: its question types;
    make: (rng, question type) -> an item of the held-out split (`InputError` when the drawn scene or clip has no
    held-out question of that type: another is drawn)."""

    name: str
    medium: str
    types: tuple[str, ...]
    make: Callable[[random.Random, str], EvalItem]
    stream: str | None = None  # the random stream its items come from (default: its name; a variant shares one)

    def items(self, n_per_type: int, seed: int = 0) -> list[EvalItem]:
        """`n_per_type` items of each question type, from the held-out split, the same for the same seed."""
        if not isinstance(n_per_type, int) or isinstance(n_per_type, bool) or n_per_type < 1:
            raise InputError(f"n_per_type must be a positive integer, got {n_per_type!r}")
        rng = random.Random(f"{self.stream or self.name}/{seed}")  # its own stream: adding a task changes no other
        items = []
        for qtype in self.types:
            while sum(item.qtype == qtype for item in items) < n_per_type:
                try:
                    items.append(self.make(rng, qtype))
                except InputError:  # no held-out wording of this type for this scene or clip: draw another
                    continue
        return items


# Medium -> whether a model with this `MMConfig` takes it. Every model reads text.
MEDIA: dict[str, Callable[[object], bool]] = {
    "text": lambda config: True,
    "image": lambda config: config.vision is not None,
    "video": lambda config: config.video_adapter is not None,
    "speech": lambda config: config.speech_adapter is not None,
    "speech and image": lambda config: config.speech_adapter is not None and config.vision is not None,
}


def _text_item(rng: random.Random, qtype: str) -> EvalItem:
    scene = random_scene(rng, "heldout")
    qa = image_question(scene, rng, "heldout", qtype)
    # The caption stands where the image will, as in the lm corpus's chat samples (`synth_text`).
    return EvalItem("text-qa", qa.qtype, f"{caption(scene, rng, 'heldout')} {qa.question}", qa.answer, scene)


def _image_item(rng: random.Random, qtype: str) -> EvalItem:
    scene = random_scene(rng, "heldout")
    qa = image_question(scene, rng, "heldout", qtype)
    return EvalItem("image-qa", qa.qtype, qa.question, qa.answer, scene, draw_scene(scene, DEFAULT_SIZE, rng))


@functools.cache
def _clips() -> tempfile.TemporaryDirectory:
    """Where this process writes the evaluation's clips (`ask` reads video files); removed when the process ends."""
    return tempfile.TemporaryDirectory(prefix="mm-llama-eval-clips-")


def _clip_item(task: str, rng: random.Random, qtype: str, shuffle: bool) -> EvalItem:
    from mm_llama.data.world_video import SAMPLED_FRAMES, encode_mp4, render_clip, sampled_indices

    clip = random_clip(rng, "heldout")
    qa, chance = time_question(clip, rng, "heldout", qtype)
    video = render_clip(clip, rng)
    frames = video.frames
    if shuffle:  # the frames the sampler takes, in an order of their own (never the identity)
        order = list(range(SAMPLED_FRAMES))
        random.Random(f"{task}/{qa.question}/{len(frames)}").shuffle(order)  # not the items' rng: the same clips
        if order == sorted(order):
            order.reverse()
        frames = frames[sampled_indices(len(frames))][order]
    mp4 = encode_mp4(frames, video.fps)
    path = Path(_clips().name) / f"{hashlib.sha256(mp4).hexdigest()[:20]}.mp4"
    path.write_bytes(mp4)
    return EvalItem(task, qa.qtype, qa.question, qa.answer, clip.start, video=path, clip=clip, chance=chance)


def _video_item(rng: random.Random, qtype: str) -> EvalItem:
    return _clip_item("video-qa", rng, qtype, shuffle=False)


def _shuffled_video_item(rng: random.Random, qtype: str) -> EvalItem:
    return _clip_item("video-qa-shuffled", rng, qtype, shuffle=True)


ASR_PROMPT = system_prompt("asr", "English")  # the paper's recognition prompt (§8.3.2), as `transcribe` asks
SPEECH_KINDS = ("question", "caption")


def _asr_item(rng: random.Random, kind: str) -> EvalItem:
    from mm_llama.data.synth_speech import spoken_sentence

    said = spoken_sentence(rng, "heldout", kind)
    return EvalItem("asr", kind, said.text, said.text, None, audio=(said.wave.numpy(), 16_000), system=ASR_PROMPT,
                    metric="wer")


def _spoken_item(rng: random.Random, qtype: str) -> EvalItem:
    from mm_llama.data.synth_speech import spoken_question

    asked = spoken_question(rng, "heldout", qtype)
    return EvalItem("spoken-qa", asked.qtype, asked.question, asked.answer, None, image=asked.image,
                    audio=(asked.wave.numpy(), 16_000))


SUITES: dict[str, tuple[Task, ...]] = {
    "shapes": (
        Task("text-qa", "text", QUESTION_TYPES, _text_item),
        Task("image-qa", "image", QUESTION_TYPES, _image_item),
        Task("video-qa", "video", TIME_QUESTION_TYPES, _video_item),
        Task("video-qa-shuffled", "video", TIME_QUESTION_TYPES, _shuffled_video_item, stream="video-qa"),
        Task("asr", "speech", SPEECH_KINDS, _asr_item),
        Task("spoken-qa", "speech and image", QUESTION_TYPES, _spoken_item),
    ),
}


def suite_tasks(suite: str, names: list[str] | None = None) -> list[Task]:
    """The tasks of `suite`, or only those named; `InputError` naming the known ones for an unknown name."""
    if suite not in SUITES:
        raise InputError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")
    tasks = list(SUITES[suite])
    if names:
        known = {t.name for t in tasks}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"unknown task(s) {', '.join(unknown)} in suite {suite!r}; its tasks: "
                             f"{', '.join(sorted(known))}")
        tasks = [t for t in tasks if t.name in names]
    return tasks
