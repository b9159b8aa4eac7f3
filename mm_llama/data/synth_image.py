"""The "shapes world" images (DESIGN §7): 1-3 coloured circles, squares and triangles on a plain background.

Each sample is a PNG (`png`), a caption (`txt`) and one question with its answer (`json`), e.g.
    What colour is the circle?           -> The circle is red.
    Where is the blue square?            -> The blue square is at the top left.
    How many shapes are there?           -> There are two shapes.
    Is there a triangle?                 -> No, there is no triangle.
The shapes of a scene are of different kinds and sit in different cells of a 3 x 3 grid, so every question has one
answer, which only the image gives. The words are those of the `synth_text` corpus that the demo trunk learns.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from mm_llama.data.pack import write_shards
from mm_llama.data.synth_text import _PLACES, COLOURS, SHAPES
from mm_llama.errors import InputError
from mm_llama.tokenizer import write_ranks

__all__ = ["draw_scene", "scene_sample", "synth_image"]

_RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 30),
        "purple": (140, 50, 180), "orange": (250, 130, 20)}
_BACKGROUNDS = ((255, 255, 255), (225, 225, 225), (60, 60, 60))  # white, light grey, dark grey: no shape colour
_NUMBERS = ("no", "one", "two", "three")

Scene = list[tuple[str, str, int, int]]  # (colour, kind, row, col) per shape


def draw_scene(scene: Scene, background: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    """Draw the shapes of `scene` in their grid cells (jittered by `rng`) on a `size` x `size` RGB image."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for colour, kind, row, col in scene:
        r = cell * rng.uniform(0.28, 0.4)  # half the shape's extent, inside its cell
        cx = (col + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        cy = (row + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        fill = _RGB[colour]
        if kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def _caption(scene: Scene) -> str:
    return " ".join(f"There is a {colour} {kind} {_PLACES[row, col]}." for colour, kind, row, col in scene)


def _question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    colour, kind, row, col = rng.choice(scene)
    asked = rng.choice(SHAPES)
    present = {k: c for c, k, _, _ in scene}
    n = len(scene)
    return rng.choice([
        (f"What colour is the {kind}?", f"The {kind} is {colour}."),
        (f"Where is the {colour} {kind}?", f"The {colour} {kind} is {_PLACES[row, col]}."),
        ("How many shapes are there?", "There is one shape." if n == 1 else f"There are {_NUMBERS[n]} shapes."),
        (f"Is there a {asked}?", f"Yes, there is a {present[asked]} {asked}." if asked in present
         else f"No, there is no {asked}."),
    ])


def scene_sample(rng: random.Random, size: int = 64) -> dict[str, bytes]:
    """One sample {"png", "txt", "json"} of a random scene; the same `rng` state gives the same bytes."""
    kinds = rng.sample(SHAPES, rng.randint(1, 3))
    cells = rng.sample(sorted(_PLACES), len(kinds))
    scene = [(rng.choice(COLOURS), kind, row, col) for kind, (row, col) in zip(kinds, cells, strict=True)]
    image = draw_scene(scene, rng.choice(_BACKGROUNDS), size, rng)
    png = io.BytesIO()
    image.save(png, format="PNG")
    question, answer = _question(scene, rng)
    return {"png": png.getvalue(), "txt": _caption(scene).encode("ascii"),
            "json": json.dumps({"question": question, "answer": answer}).encode("ascii")}


def synth_image(out: Path, n: int, *, seed: int = 0, shard_size: int = 1000, size: int = 64) -> list[Path]:
    """Write `n` shapes-world images with captions and Q/A as webdataset shards, plus a byte-level tokenizer.

    Args:
        out: output folder; shards are `out/image-000000.tar`, … and the tokenizer `out/tokenizer.model` (256 byte
            ranks: n_words = 512, the `debug` trunk's vocabulary).
        n: number of samples.
        seed: the same seed gives the same shards, byte for byte.
        shard_size: samples per shard.
        size: image side in pixels.
    Returns:
        the shard paths.
    """
    for name, value, low in (("n", n, 1), ("size", size, 12)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    rng = random.Random(seed)

    def samples() -> Iterator[dict[str, bytes]]:
        for _ in range(n):
            yield scene_sample(rng, size)

    paths = write_shards(Path(out), "image", samples(), shard_size=shard_size, total=n, desc="synth image")
    write_ranks(Path(out) / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return paths
