"""Shapes-world images (see `mm_llama.data.world`): one scene per sample, with a caption and a few questions.

Each sample is a PNG (`png`), a caption (`txt`) and a question with its answer and type, plus follow-up questions
about the same picture (`json`; `mm_llama.data.image` trains them as the later turns of one chat), e.g.
    png   84 x 84: a big red circle at the top left, a small blue star in the middle, on light grey
    txt   There are two shapes: a big red circle at the top left and a small blue star in the middle.
    json  {"question": "Is the star left of the circle?", "answer": "No, the star is right of the circle.",
           "type": "relative position", "follow_ups": [{"question": "What shape is in the middle?",
           "answer": "It is a star.", "type": "shape"}, ...]}
Question types are drawn uniformly (QUESTION_TYPES) unless weighted (`type_weights`), and only the image answers the
questions. The words are those of the `synth_text` corpus that the trunk learns in stage `lm`.
"""

from __future__ import annotations

import functools
import io
import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from mm_llama.data.pack import write_shards
from mm_llama.data.synth_parallel import parallel_samples
from mm_llama.data.world import check_split, random_scene
from mm_llama.data.world_draw import DEFAULT_SIZE, MIN_SIZE, draw_scene
from mm_llama.data.world_language import QA, QUESTION_TYPES, caption, image_question
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.errors import InputError
from mm_llama.values import is_finite_number

T = TypeVar("T")

__all__ = ["QUESTIONS_PER_IMAGE", "check_sample_args", "first_question", "follow_ups", "image_sample", "synth_image",
           "type_weights_list"]

# Questions per picture. With one, a batch of 64 held about 2 of the "which shape is at <place>" questions that the
# adapter must learn to look up by place; four took held-out image QA from 85 % to 90 % (issue 10) and cost little
# (the ViT runs once per picture; the small trunk reads a longer chat).
QUESTIONS_PER_IMAGE = 4


def type_weights_list(weights: Mapping[str, float] | None, types: Sequence[str] = QUESTION_TYPES,
                      defaults: Mapping[str, float] | None = None) -> list[float]:
    """Per question type of `types`, the relative weight of drawing it: `weights[type]`, else `defaults[type]`, else
    1 (None: all the defaults). `InputError` for an unknown type or a weight that is not a finite number >= 0, or
    when all are 0."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(types))
    if unknown:
        raise InputError(f"unknown question type(s) {unknown} in the type weights; accepted: {', '.join(types)}")
    out = [weights.get(t, (defaults or {}).get(t, 1.0)) for t in types]
    if not all(is_finite_number(w) and w >= 0 for w in out) or not any(out):
        raise InputError(f"type weights must be finite numbers >= 0, not all 0; got {weights}")
    return [float(w) for w in out]


def check_sample_args(split: str, n: int, size: int, questions: int) -> None:
    """`InputError` for a split that is not "train"/"heldout", or a count, pixel size or number of questions out of
    range: said before any work."""
    check_split(split)
    for name, value, low in (("n", n, 1), ("size", size, MIN_SIZE), ("questions", questions, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")


def first_question(rng: random.Random, types: Sequence[str], weights: Sequence[float],
                   subject: Callable[[], T], describe: Callable[[T], str], ask: Callable[[T, str], QA]
                   ) -> tuple[T, str, QA]:
    """A subject (a scene, a clip), its description and a first question of a type drawn by `weights`. The type is
    drawn first, so that each type's share is its weight's whatever subjects allow; subjects that have nothing of it
    (or nothing to say: `InputError` from `describe`/`ask`) are drawn again."""
    qtype = rng.choices(types, weights)[0]
    while True:
        drawn = subject()
        try:
            return drawn, describe(drawn), ask(drawn, qtype)
        except InputError:
            continue


def follow_ups(rng: random.Random, types: Sequence[str], weights: Sequence[float], ask: Callable[[str], QA],
               first: QA, n: int) -> list[dict]:
    """Up to `n` more questions about the same subject, types drawn by `weights`: a type the subject has none of
    (`InputError` from `ask`) or a repeated question is left out. As JSON records {"question", "answer", "type"}."""
    asked, out = {first.question}, []
    for _ in range(n):
        try:
            more = ask(rng.choices(types, weights)[0])
        except InputError:
            continue
        if more.question not in asked:
            asked.add(more.question)
            out.append({"question": more.question, "answer": more.answer, "type": more.qtype})
    return out


def image_sample(rng: random.Random, split: str = "train", size: int = DEFAULT_SIZE,
                 questions: int = QUESTIONS_PER_IMAGE, type_weights: Mapping[str, float] | None = None
                 ) -> dict[str, bytes]:
    """One sample {"png", "txt", "json"} of a random scene of `split`; the same `rng` state gives the same bytes.

    Args:
        rng: the random source.
        split: "train" or "heldout": the scene, the caption and the questions all belong to it.
        size: the image side in pixels (>= 30).
        questions: questions about the picture (>= 1): the first, then `questions - 1` follow-ups, each of a
            type drawn by `type_weights`; a follow-up that repeats an earlier question, or whose type the scene does
            not allow, is left out.
        type_weights: relative weights of the question types (see `type_weights_list`); None: uniform.
    Returns:
        the members: PNG bytes, the caption, and JSON {"question", "answer", "type", "follow_ups": [{"question",
        "answer", "type"}, ...]} (types in QUESTION_TYPES), ASCII.
    """
    check_split(split)
    weights = type_weights_list(type_weights)
    # Redrawn when there is nothing of this split to say about the scene (or no second shape to relate).
    scene, text, qa = first_question(rng, QUESTION_TYPES, weights, lambda: random_scene(rng, split),
                                     lambda scene: caption(scene, rng, split),
                                     lambda scene, qtype: image_question(scene, rng, split, qtype))
    png = io.BytesIO()
    draw_scene(scene, size, rng).save(png, format="PNG")
    more = follow_ups(rng, QUESTION_TYPES, weights, lambda qtype: image_question(scene, rng, split, qtype), qa,
                      questions - 1)
    record = {"question": qa.question, "answer": qa.answer, "type": qa.qtype, "follow_ups": more}
    return {"png": png.getvalue(), "txt": text.encode("ascii"), "json": json.dumps(record).encode("ascii")}


def synth_image(out: Path, n: int, *, seed: int = 0, split: str = "train", size: int = DEFAULT_SIZE,
                questions: int = QUESTIONS_PER_IMAGE, type_weights: Mapping[str, float] | None = None,
                shard_size: int = 1000, workers: int | None = None) -> list[Path]:
    """Write `n` shapes-world images with captions and Q/A as webdataset shards, plus the world's tokenizer.

    Args:
        out: output folder; shards are `out/image-000000.tar`, … and the tokenizer `out/tokenizer.model` (the world's
            tokenizer, n_words = 768: the `debug` trunk's vocabulary).
        n: number of samples.
        seed: the same seed gives the same shards, byte for byte, whatever `workers` is.
        split: "train" or "heldout" (see `mm_llama.data.world`): the two never share a scene, caption or question.
        size: image side in pixels, >= 30 (84: cells of 28 px, 2 x 2 patches of 14 px).
        questions: questions per picture, >= 1 (see `image_sample`).
        type_weights: relative weights of the question types, e.g. {"shape": 2} (see `type_weights_list`); None:
            uniform.
        shard_size: samples per shard.
        workers: processes drawing the samples (None: the usable cores, at most 16; see `synth_parallel`).
    Returns:
        the shard paths.
    """
    check_sample_args(split, n, size, questions)
    type_weights_list(type_weights)  # said before any work
    sample = functools.partial(image_sample, split=split, size=size, questions=questions, type_weights=type_weights)
    samples = parallel_samples(sample, n, seed=seed, workers=workers)
    paths = write_shards(Path(out), "image", samples, shard_size=shard_size, total=n, desc="synth image")
    write_world_tokenizer(Path(out) / "tokenizer.model")
    return paths
