"""The "shapes world" (DESIGN §7): scenes of coloured shapes on a 3 x 3 grid, their clips, and the train/held-out split.

One closed world is shared by every medium: the text corpus of stage `lm` describes it, the images of the image
stages draw it, and the video and speech stages will show and speak it. Its language lives in `world_language`
(captions, image questions), `world_clips` (events and video questions) and `world_dialogue` (spoken turns); its
pictures in `world_draw`.

A scene holds 1-4 shapes of different kinds (so "the circle" always names one shape), each in its own cell, of any
colour (colours may repeat) and one of two sizes, on a plain background.

Splits (deterministic, from a stable hash, never from Python's `hash`):
    scenes     10 % are held out: `split_of_scene` hashes the scene's `key()`, i.e. its shapes; the background is a
               rendering choice like the jitter, so a held-out arrangement of shapes is never seen on any background.
    sentences  ~15 % are held out: `split_of_sentence` hashes a whole string. A "sentence" is a question, a caption, an
               event description or a user line of a dialogue.
Every generator takes `split` ("train" | "heldout") and resamples what belongs to the other split, so train and
held-out share no scene and no question, caption, event description or user line. Answers, and the true statements
of a text description, are exempt: they are outputs determined by a question (or a fact) and the scene ("The circle
is red." answers a train question about one scene and a held-out question about another).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

from mm_llama.errors import InputError

__all__ = [
    "BACKGROUNDS", "COLOURS", "DIRECTIONS", "GRID", "MAX_SHAPES", "PLACES", "SHAPES", "SIZES", "SPLITS", "Scene",
    "Shape", "check_split", "random_scene", "relations", "split_of_scene", "split_of_sentence",
]

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "big")
BACKGROUNDS = ("white", "light grey", "dark grey")
GRID = 3  # cells per side
# Grid cell (row, col) → where it is, in words.
PLACES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}  # fmt: skip
# Direction → (row step, col step).
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPLITS = ("train", "heldout")
MAX_SHAPES = len(SHAPES)  # kinds differ within a scene
_HELDOUT_SCENES = 100  # per mille
_HELDOUT_SENTENCES = 150  # per mille


@dataclass(frozen=True, order=True)
class Shape:
    """One shape: `kind` in SHAPES, `colour` in COLOURS, `size` in SIZES, in grid cell (`row`, `col`), 0-based from
    the top left."""

    kind: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def place(self) -> str:
        """Where it is, in words ("at the top left")."""
        return PLACES[self.row, self.col]

    @property
    def cell(self) -> tuple[int, int]:
        return self.row, self.col


@dataclass(frozen=True)
class Scene:
    """1-4 shapes of different kinds in different cells, on a `background` in BACKGROUNDS."""

    shapes: tuple[Shape, ...]
    background: str

    def key(self) -> str:
        """The canonical string of the shapes (sorted), which identifies the scene for splits and captions.

        The background is not part of it: like the jitter of the drawing, it is not described by the language.
        """
        return "; ".join(f"{s.size} {s.colour} {s.kind} {s.row} {s.col}" for s in sorted(self.shapes))

    def shape(self, kind: str) -> Shape | None:
        """The shape of that kind, or None."""
        return next((s for s in self.shapes if s.kind == kind), None)

    def at(self, row: int, col: int) -> Shape | None:
        """The shape in that cell, or None."""
        return next((s for s in self.shapes if s.cell == (row, col)), None)


def relations(a: Shape, b: Shape) -> list[str]:
    """Every true "a is <relation> b" among "left of", "right of", "above", "below", by the shapes' cells."""
    out = []
    if a.col != b.col:
        out.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        out.append("above" if a.row < b.row else "below")
    return out


def _stable(text: str) -> int:
    """A per-mille bucket of `text` that is the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 1000


def split_of_scene(scene: Scene) -> str:
    """"heldout" for ~10 % of scenes (by `scene.key()`), "train" for the rest."""
    return "heldout" if _stable("scene:" + scene.key()) < _HELDOUT_SCENES else "train"


@lru_cache(maxsize=1 << 16)  # questions repeat a lot
def split_of_sentence(text: str) -> str:
    """"heldout" for ~15 % of sentences (questions, captions, event descriptions, user lines), "train" for the rest.

    Args:
        text: the whole sentence, exactly as it is written in a sample.
    """
    return "heldout" if _stable("sentence:" + text) < _HELDOUT_SENTENCES else "train"


def check_split(split: str) -> str:
    """`split`, or `InputError` naming what is accepted."""
    if split not in SPLITS:
        raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
    return split


def random_scene(rng: random.Random, split: str = "train", *, n_shapes: int | None = None) -> Scene:
    """A random scene of `split` (scenes of the other split are drawn again).

    Args:
        rng: the random source; the same state gives the same scene.
        split: "train" or "heldout".
        n_shapes: 1-4 shapes; None draws the number uniformly.
    Returns:
        the scene.
    """
    check_split(split)
    if n_shapes is not None and not (isinstance(n_shapes, int) and 1 <= n_shapes <= MAX_SHAPES):
        raise InputError(f"n_shapes must be an integer in [1, {MAX_SHAPES}] or None, got {n_shapes!r}")
    while True:
        n = n_shapes or rng.randint(1, MAX_SHAPES)
        kinds = rng.sample(SHAPES, n)
        cells = rng.sample(sorted(PLACES), n)
        shapes = tuple(Shape(kind, rng.choice(COLOURS), rng.choice(SIZES), row, col)
                       for kind, (row, col) in zip(kinds, cells, strict=True))
        scene = Scene(shapes, rng.choice(BACKGROUNDS))
        if split_of_scene(scene) == split:
            return scene
