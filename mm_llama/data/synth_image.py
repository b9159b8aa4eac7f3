"""Shapes-world images (see `mm_llama.data.world`): one scene per sample, with a caption and one question.

Each sample is a PNG (`png`), a caption (`txt`) and a question with its answer and type (`json`), e.g.
    png   84 x 84: a big red circle at the top left, a small blue star in the middle, on light grey
    txt   There are two shapes: a big red circle at the top left and a small blue star in the middle.
    json  {"question": "Is the star left of the circle?", "answer": "No, the star is right of the circle.",
           "type": "relative position"}
Question types are drawn uniformly (QUESTION_TYPES), and only the image answers the question. The words are those of
the `synth_text` corpus that the trunk learns in stage `lm`.
"""

from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

from mm_llama.data.pack import write_shards
from mm_llama.data.synth_parallel import parallel_samples
from mm_llama.data.world import check_split, random_scene
from mm_llama.data.world_draw import DEFAULT_SIZE, MIN_SIZE, draw_scene
from mm_llama.data.world_language import QUESTION_TYPES, caption, image_question
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.errors import InputError

__all__ = ["image_sample", "synth_image"]


def image_sample(rng: random.Random, split: str = "train", size: int = DEFAULT_SIZE) -> dict[str, bytes]:
    """One sample {"png", "txt", "json"} of a random scene of `split`; the same `rng` state gives the same bytes.

    Args:
        rng: the random source.
        split: "train" or "heldout": the scene, the caption and the question all belong to it.
        size: the image side in pixels (>= 30).
    Returns:
        the members: PNG bytes, the caption, and JSON {"question", "answer", "type"} (type in QUESTION_TYPES), ASCII.
    """
    check_split(split)
    qtype = rng.choice(QUESTION_TYPES)  # first, so that each type is 1/7 of the samples whatever scenes allow
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
    record = {"question": qa.question, "answer": qa.answer, "type": qa.qtype}
    return {"png": png.getvalue(), "txt": text.encode("ascii"), "json": json.dumps(record).encode("ascii")}


def synth_image(out: Path, n: int, *, seed: int = 0, split: str = "train", size: int = DEFAULT_SIZE,
                shard_size: int = 1000, workers: int | None = None) -> list[Path]:
    """Write `n` shapes-world images with captions and Q/A as webdataset shards, plus the world's tokenizer.

    Args:
        out: output folder; shards are `out/image-000000.tar`, … and the tokenizer `out/tokenizer.model` (the world's
            tokenizer, n_words = 768: the `debug` trunk's vocabulary).
        n: number of samples.
        seed: the same seed gives the same shards, byte for byte, whatever `workers` is.
        split: "train" or "heldout" (see `mm_llama.data.world`): the two never share a scene, caption or question.
        size: image side in pixels, >= 30 (84: cells of 28 px, 2 x 2 patches of 14 px).
        shard_size: samples per shard.
        workers: processes drawing the samples (None: the usable cores, at most 16; see `synth_parallel`).
    Returns:
        the shard paths.
    """
    check_split(split)
    for name, value, low in (("n", n, 1), ("size", size, MIN_SIZE)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    samples = parallel_samples(functools.partial(image_sample, split=split, size=size), n, seed=seed, workers=workers)
    paths = write_shards(Path(out), "image", samples, shard_size=shard_size, total=n, desc="synth image")
    write_world_tokenizer(Path(out) / "tokenizer.model")
    return paths
