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
from collections.abc import Mapping
from pathlib import Path

from mm_llama.data.pack import write_shards
from mm_llama.data.synth_parallel import parallel_samples
from mm_llama.data.world import check_split, random_scene
from mm_llama.data.world_draw import DEFAULT_SIZE, MIN_SIZE, draw_scene
from mm_llama.data.world_language import QUESTION_TYPES, caption, image_question
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.errors import InputError
from mm_llama.values import is_finite_number

__all__ = ["QUESTIONS_PER_IMAGE", "image_sample", "synth_image", "type_weights_list"]

# Questions per picture. With one, a batch of 64 held about 2 of the "which shape is at <place>" questions that the
# adapter must learn to look up by place; four took held-out image QA from 85 % to 90 % (issue 10) and cost little
# (the ViT runs once per picture; the small trunk reads a longer chat).
QUESTIONS_PER_IMAGE = 4


def type_weights_list(weights: Mapping[str, float] | None) -> list[float]:
    """Per QUESTION_TYPES, the relative weight of drawing it: `weights[type]`, 1 for a type not named (None: all 1).
    `InputError` for an unknown type or a weight that is not a finite number >= 0, or when all are 0."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(QUESTION_TYPES))
    if unknown:
        raise InputError(f"unknown question type(s) {unknown} in the type weights; accepted: "
                         f"{', '.join(QUESTION_TYPES)}")
    out = [weights.get(t, 1.0) for t in QUESTION_TYPES]
    if not all(is_finite_number(w) and w >= 0 for w in out) or not any(out):
        raise InputError(f"type weights must be finite numbers >= 0, not all 0; got {weights}")
    return [float(w) for w in out]


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
    # The type first, so that each type's share is its weight's whatever scenes allow (1/7 each when uniform).
    qtype = rng.choices(QUESTION_TYPES, weights)[0]
    while True:
        scene = random_scene(rng, split)
        try:
            text = caption(scene, rng, split)
            qa = image_question(scene, rng, split, qtype)
        except InputError:  # nothing of this split to say about this scene (or no second shape to relate)
            continue
        break
    png = io.BytesIO()
    draw_scene(scene, size, rng).save(png, format="PNG")
    asked, follow_ups = {qa.question}, []
    for _ in range(questions - 1):
        try:
            more = image_question(scene, rng, split, rng.choices(QUESTION_TYPES, weights)[0])
        except InputError:  # a type this scene has none of in this split (a relation needs two shapes)
            continue
        if more.question not in asked:
            asked.add(more.question)
            follow_ups.append({"question": more.question, "answer": more.answer, "type": more.qtype})
    record = {"question": qa.question, "answer": qa.answer, "type": qa.qtype, "follow_ups": follow_ups}
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
    check_split(split)
    for name, value, low in (("n", n, 1), ("size", size, MIN_SIZE), ("questions", questions, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    type_weights_list(type_weights)  # said before any work
    sample = functools.partial(image_sample, split=split, size=size, questions=questions, type_weights=type_weights)
    samples = parallel_samples(sample, n, seed=seed, workers=workers)
    paths = write_shards(Path(out), "image", samples, shard_size=shard_size, total=n, desc="synth image")
    write_world_tokenizer(Path(out) / "tokenizer.model")
    return paths
