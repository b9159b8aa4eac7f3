"""Evaluation tasks: deterministic held-out questions with exact answers, grouped in suites.

A task is a name, the medium the model needs for it, and a generator of `EvalItem`s from the held-out split of the
shapes world (`mm_llama.data.world`: no scene or sentence of it was trained on), balanced over its question types.
Answers are a function of the question and the scene, so grading is an exact match. Video and speech add their
tasks to `SUITES["shapes"]` (issues 11-12), a line to `MEDIA` and a field to `EvalItem`; the runner does not
change.

    text-qa    the trunk's language (stage lm): a caption, then a question about it, in one user message
                   "There is a big red circle at the top left. Where is the circle?" -> "The circle is at the top left."
    image-qa   the image stage: the drawn scene and the question alone
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from mm_llama.data.world import Scene, random_scene
from mm_llama.data.world_draw import DEFAULT_SIZE, draw_scene
from mm_llama.data.world_language import QA, QUESTION_TYPES, caption, image_question
from mm_llama.errors import InputError

__all__ = ["MEDIA", "SUITES", "EvalItem", "Task", "suite_tasks"]


@dataclass(frozen=True)
class EvalItem:
    """One question: what the user sends (text, and an image or nothing), the one right answer, and the scene asked
    about. `media()` gives the item's media as `Assistant.ask` takes them."""

    task: str
    qtype: str
    question: str
    answer: str
    scene: Scene
    image: Image.Image | None = None

    def media(self) -> dict:
        """The media keyword arguments of `Assistant.ask` for this item: {} for text alone, {"image": ...}."""
        return {} if self.image is None else {"image": self.image}


@dataclass(frozen=True)
class Task:
    """name; medium: what the model needs (a key of `MEDIA`: "text", "image"); types: its question types;
    make: (scene, QA, rng) -> the item for one held-out scene and question."""

    name: str
    medium: str
    types: tuple[str, ...]
    make: Callable[[Scene, QA, random.Random], EvalItem]

    def items(self, n_per_type: int, seed: int = 0) -> list[EvalItem]:
        """`n_per_type` items of each question type, from the held-out split, the same for the same seed."""
        if not isinstance(n_per_type, int) or isinstance(n_per_type, bool) or n_per_type < 1:
            raise InputError(f"n_per_type must be a positive integer, got {n_per_type!r}")
        rng = random.Random(f"{self.name}/{seed}")  # each task its own stream: adding a task changes no other
        items = []
        for qtype in self.types:
            while sum(item.qtype == qtype for item in items) < n_per_type:
                scene = random_scene(rng, "heldout")
                try:
                    qa = image_question(scene, rng, "heldout", qtype)
                    items.append(self.make(scene, qa, rng))
                except InputError:  # no held-out wording of this type for this scene: draw another
                    continue
        return items


# Medium -> whether a model with this `MMConfig` takes it. Every model reads text.
MEDIA: dict[str, Callable[[object], bool]] = {
    "text": lambda config: True,
    "image": lambda config: config.vision is not None,
}


def _text_item(scene: Scene, qa: QA, rng: random.Random) -> EvalItem:
    # The caption stands where the image will, as in the lm corpus's chat samples (`synth_text`).
    return EvalItem("text-qa", qa.qtype, f"{caption(scene, rng, 'heldout')} {qa.question}", qa.answer, scene)


def _image_item(scene: Scene, qa: QA, rng: random.Random) -> EvalItem:
    return EvalItem("image-qa", qa.qtype, qa.question, qa.answer, scene, draw_scene(scene, DEFAULT_SIZE, rng))


SUITES: dict[str, tuple[Task, ...]] = {
    "shapes": (
        Task("text-qa", "text", QUESTION_TYPES, _text_item),
        Task("image-qa", "image", QUESTION_TYPES, _image_item),
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
