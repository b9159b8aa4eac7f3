"""Pictures of the shapes world (see `mm_llama.data.world`): one scene → one PIL image.

Each shape is drawn inside its grid cell: its "radius" (half its extent) is 0.20-0.26 of the cell side when small and
0.36-0.44 when big (ranges far apart, so the two sizes never look alike), and its centre is jittered a little, never
so far that it leaves its cell. At the default 84 px a cell is 28 px: 2 x 2 patches of a 14-px-patch ViT at tile 84.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from mm_llama.data.world import GRID, Scene
from mm_llama.errors import InputError

__all__ = ["BACKGROUND_RGB", "DEFAULT_SIZE", "MIN_SIZE", "RADIUS", "RGB", "draw_scene", "draw_shape", "shape_look"]

DEFAULT_SIZE = 84
MIN_SIZE = 30  # cells of 10 px: below, the pixels of a small shape and a big one start to overlap in count
RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 30),
       "purple": (140, 50, 180), "orange": (250, 130, 20)}
BACKGROUND_RGB = {"white": (255, 255, 255), "light grey": (225, 225, 225), "dark grey": (60, 60, 60)}  # no shape's
RADIUS = {"small": (0.20, 0.26), "big": (0.36, 0.44)}  # half the shape's extent, as a fraction of the cell side
_JITTER = 0.06  # most the centre moves, as a fraction of the cell side
_STAR_INNER = 0.45  # inner / outer radius of the 5-pointed star


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The 10 corners of a 5-pointed star, one point straight up."""
    corners = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * _STAR_INNER
        angle = -math.pi / 2 + i * math.pi / 5
        corners.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return corners


def shape_look(size: str, cell: float, rng: random.Random) -> tuple[float, float, float]:
    """A shape's radius and the jitter of its centre (dx, dy) in a cell of `cell` pixels, drawn from `rng` (radius,
    then dx, then dy): inside its cell, a pixel's margin left."""
    r = min(cell * rng.uniform(*RADIUS[size]), cell / 2 - 1)
    # PIL fills the end pixel of a box too: 1 px of margin keeps the shape out of the next cell.
    room = max(0.0, min(_JITTER * cell, cell / 2 - r - 1))
    return r, rng.uniform(-room, room), rng.uniform(-room, room)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
               ) -> None:
    """One shape of radius `r` centred at (cx, cy)."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # "star"
        draw.polygon(_star(cx, cy, r), fill=fill)


def draw_scene(scene: Scene, size_px: int, rng: random.Random) -> Image.Image:
    """Draw a scene.

    Args:
        scene: the scene.
        size_px: the image side in pixels, >= MIN_SIZE (DEFAULT_SIZE: 84).
        rng: draws each shape's radius within its size's range and its jitter; the same state gives the same image.
    Returns:
        a `size_px` x `size_px` RGB image; every shape lies inside its cell, a pixel's margin left.
    """
    if not isinstance(size_px, int) or isinstance(size_px, bool) or size_px < MIN_SIZE:
        raise InputError(f"the image size must be an integer >= {MIN_SIZE} pixels, got {size_px!r}")
    image = Image.new("RGB", (size_px, size_px), BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size_px / GRID
    for shape in scene.shapes:
        r, dx, dy = shape_look(shape.size, cell, rng)
        draw_shape(draw, shape.kind, (shape.col + 0.5) * cell + dx, (shape.row + 0.5) * cell + dy, r,
                   RGB[shape.colour])
    return image
