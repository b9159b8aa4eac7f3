"""The "shapes world" text corpus (DESIGN §7): short English descriptions of scenes of coloured shapes.

Each sample describes one scene of 1-5 shapes on a 3 x 3 grid, in 3-6 lines such as
    There are two green triangles.
    The red circle is left of the blue square.
    Q: What colour is the square? A: The square is blue.
Every line is ASCII and true of its scene, so a tiny trunk (the `debug` preset, byte-level vocabulary of 512) can
learn the language the image, video and speech stages later ground.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from mm_llama.data.pack import write_shards
from mm_llama.errors import InputError
from mm_llama.tokenizer import write_ranks

__all__ = ["COLOURS", "SHAPES", "scene_text", "synth_text"]

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
_NUMBERS = ("no", "one", "two", "three", "four", "five")
# Grid cell (row, col) → where it is, in words.
_PLACES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}  # fmt: skip
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


class _Shape(NamedTuple):
    colour: str
    kind: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"the {self.colour} {self.kind}"


def _count(n: int, noun: str) -> str:
    """"There is one circle" / "There are two circles" / "There are no circles"."""
    return f"There is one {noun}" if n == 1 else f"There are {_NUMBERS[n]} {noun}s"


def _relations(a: _Shape, b: _Shape) -> list[str]:
    """Every true "a is <relation> b"."""
    out = []
    if a.col != b.col:
        out.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        out.append("above" if a.row < b.row else "below")
    return out


def _lines(shapes: list[_Shape], rng: random.Random) -> list[str]:
    """All candidate lines about a scene (statements and Q/A), each true of it."""
    groups = Counter((s.colour, s.kind) for s in shapes)
    kinds = Counter(s.kind for s in shapes)
    named = [s for s in shapes if groups[s.colour, s.kind] == 1]  # "the red circle" picks out exactly one shape
    lines = [f"{_count(n, f'{colour} {kind}')}." for (colour, kind), n in groups.items()]
    for s in named:
        lines.append(f"{s.name.capitalize()} is {_PLACES[s.row, s.col]}.")
        lines.append(f"Q: Where is {s.name}? A: {s.name.capitalize()} is {_PLACES[s.row, s.col]}.")
    for kind in SHAPES:
        answer = _count(kinds[kind], kind)
        lines.append(f"Q: How many {kind}s are there? A: {answer}.")
        only = [s for s in shapes if s.kind == kind]
        if len(only) == 1:
            lines.append(f"Q: What colour is the {kind}? A: The {kind} is {only[0].colour}.")
    for a in named:
        for b in named:
            if a is b:
                continue
            true = _relations(a, b)
            if not true:
                continue
            rel = rng.choice(true)
            lines.append(f"{a.name.capitalize()} is {rel} {b.name}.")
            asked = rel if rng.random() < 0.5 else _OPPOSITE[rel]
            answer = "Yes" if asked in true else "No"
            lines.append(f"Q: Is {a.name} {asked} {b.name}? A: {answer}, {a.name} is {rel} {b.name}.")
    return lines


def scene_text(rng: random.Random) -> str:
    """One sample: a random scene described in 3-6 lines (fewer when the scene offers fewer), joined by newlines.

    Args:
        rng: the random source; the same state gives the same text.
    Returns:
        the text, ASCII.
    """
    cells = rng.sample(sorted(_PLACES), rng.randint(1, 5))
    shapes = [_Shape(rng.choice(COLOURS), rng.choice(SHAPES), row, col) for row, col in cells]
    lines = _lines(shapes, rng)
    return "\n".join(rng.sample(lines, min(len(lines), rng.randint(3, 6))))


def synth_text(out: Path, n: int, *, seed: int = 0, shard_size: int = 1000) -> list[Path]:
    """Write `n` shapes-world text samples as `txt` shards, plus a byte-level `tokenizer.model`, into `out`.

    Args:
        out: output folder; shards are `out/text-000000.tar`, … and the tokenizer `out/tokenizer.model` (256 byte
            ranks, so n_words = 512: the `debug` trunk's vocabulary).
        n: number of samples.
        seed: the same seed gives the same corpus, byte for byte.
        shard_size: samples per shard.
    Returns:
        the shard paths.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be a positive number of samples, got {n!r}")
    rng = random.Random(seed)

    def samples() -> Iterator[dict[str, bytes]]:
        for _ in range(n):
            yield {"txt": scene_text(rng).encode("ascii")}

    paths = write_shards(Path(out), "text", samples(), shard_size=shard_size, total=n, desc="synth text")
    write_ranks(Path(out) / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return paths
