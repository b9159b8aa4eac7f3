"""Videos of the shapes world: a `Clip` (see `mm_llama.data.world_clips`) → frames → H.264 mp4.

A clip lasts 2-4 s at 8-15 fps (16-60 frames; both drawn per clip). Its start scene is drawn exactly as `world_draw`
draws a picture (a frame of a still scene is the image world's picture, pixel for pixel), then its events happen, in
order, at random frames:
    move         the shape glides to the next cell over 0.3-1 s (1-3 cells/s)
    recolour     the colour switches between two frames, or fades over 0.15-0.3 s (half of each)
    appear       the shape pops in between two frames
    disappear    the shape pops out between two frames
Each shape keeps its radius and jitter for the whole clip (a moved shape keeps its offset within the cell).

Every event is seen by a model that samples 16 frames uniformly (`sampled_indices`, index i = floor((i + 0.5) n / 16),
the demo's sampler): events happen between 25 % and 75 % of the clip, so the first 4 and the last 4 sampled frames
show the states before and after each event; a glide spans a sampled frame (the shape is seen on its way), and between
two events lies a sampled frame (their order is seen).

`encode_mp4` pipes the raw frames into one `ffmpeg` process per clip (libx264, yuv420p, CRF 15, faststart): about
0.1 s a clip on one core, almost all of it ffmpeg's start-up (drawing the frames takes ~3 ms); 2.5-5.5 kB a clip at
84 px. The same frames give the same bytes (one thread, bit-exact flags) with the same ffmpeg build; another build
(e.g. imageio-ffmpeg's) may write other, equally valid bytes.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mm_llama.data.world import GRID
from mm_llama.data.world_clips import Appear, Clip, Disappear, Event, Move, Recolour
from mm_llama.data.world_draw import BACKGROUND_RGB, DEFAULT_SIZE, MIN_SIZE, RGB, draw_shape, shape_look
from mm_llama.errors import InputError

__all__ = ["FPS", "SAMPLED_FRAMES", "SECONDS", "Video", "check_timing", "encode_mp4", "find_ffmpeg", "render_clip",
           "sampled_indices", "schedule"]

FPS = (8, 15)  # frames per second, drawn per clip (inclusive)
SECONDS = (2.0, 4.0)  # clip length, drawn per clip
SAMPLED_FRAMES = 16  # frames the demo's video path samples per clip; a clip has at least this many
WINDOW = (0.25, 0.75)  # events happen within this part of the clip: the states before and after each last >= 1/4
GLIDE_SECONDS = (0.3, 1.0)  # a move's duration: 1-3.3 cells per second
FADE_SECONDS = (0.15, 0.3)  # a colour fade's duration (the other half of recolours switch between two frames)
CRF = 15  # x264 quality: the centre colour of a decoded shape stays within a few levels of the drawn one (test)


@dataclass(frozen=True)
class Video:
    """A rendered clip.

    frames: (n, H, W, 3) uint8 RGB, n = round(seconds * fps) >= SAMPLED_FRAMES.
    fps: frames per second.
    spans: per event of the clip, (a, b) with a < b: frames <= a show the state before it, frames >= b the state after
        it, frames in between the glide or fade.
    """

    frames: np.ndarray
    fps: int
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Look:
    """How one shape (a kind: unique within a clip) is drawn: its radius and its centre's offset from its cell's."""

    r: float
    dx: float
    dy: float


def sampled_indices(n_frames: int, k: int = SAMPLED_FRAMES) -> list[int]:
    """The `k` frame indices the model's sampler takes of `n_frames` (`encoders.video.uniform_indices`)."""
    from encoders.video import uniform_indices

    return uniform_indices(n_frames, k)


def check_timing(fps: tuple[int, int], seconds: tuple[float, float]) -> None:
    """`InputError` unless `fps` is (low, high) integers in [1, 60] and `seconds` (low, high) finite positive numbers,
    low <= high, such that the shortest clip has at least SAMPLED_FRAMES frames."""
    ok_fps = (isinstance(fps, tuple) and len(fps) == 2 and all(isinstance(f, int) and not isinstance(f, bool)
                                                                and 1 <= f <= 60 for f in fps) and fps[0] <= fps[1])
    if not ok_fps:
        raise InputError(f"fps must be (low, high) integers in [1, 60], low <= high; got {fps!r}")
    ok_seconds = (isinstance(seconds, tuple) and len(seconds) == 2 and all(
        isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in seconds)
        and seconds[0] <= seconds[1])
    if not ok_seconds:
        raise InputError(f"seconds must be (low, high) finite numbers > 0, low <= high; got {seconds!r}")
    if round(seconds[0] * fps[0]) < SAMPLED_FRAMES:
        raise InputError(f"the shortest clip ({seconds[0]} s at {fps[0]} fps) must have at least {SAMPLED_FRAMES} "
                         f"frames, the frames a model samples; got {round(seconds[0] * fps[0])}")


def _duration(event: Event, fps: int, n_frames: int, room: int, rng: random.Random) -> int:
    """Frames from the last frame before the event to the first after it (1: it happens between two frames)."""
    if isinstance(event, Move):
        # Longer than the sampler's step, so a sampled frame shows the shape on its way.
        shortest = -(-n_frames // SAMPLED_FRAMES) + 1
        return min(room, max(shortest, round(fps * rng.uniform(*GLIDE_SECONDS))))
    if isinstance(event, Recolour) and rng.random() < 0.5:
        return min(room, max(2, round(fps * rng.uniform(*FADE_SECONDS))))
    return 1


def schedule(events: tuple[Event, ...], n_frames: int, fps: int, rng: random.Random) -> tuple[tuple[int, int], ...]:
    """When each event happens: per event, (a, b) (see `Video.spans`), in order, within WINDOW of the clip.

    The window is cut into one slot per event, with a gap of ceil(n / 16) - 1 frames between slots: the frames from
    one event's end to the next one's start then hold a sampled frame. Each event lies at a random place in its slot.
    """
    first, last = math.ceil(WINDOW[0] * n_frames), math.floor(WINDOW[1] * n_frames)
    gap = -(-n_frames // SAMPLED_FRAMES) - 1
    width = (last - first - gap * (len(events) - 1)) / len(events)
    spans = []
    for i, event in enumerate(events):
        start = first + i * (width + gap)
        lo, hi = math.ceil(start), math.floor(start + width)
        d = _duration(event, fps, n_frames, hi - lo, rng)
        a = rng.randint(lo, hi - d)
        spans.append((a, a + d))
    return tuple(spans)


def _looks(clip: Clip, size: int, rng: random.Random) -> dict[str, _Look]:
    """Each shape's look, drawn as `draw_scene` draws it (the same rng calls, in the same order, for the start scene),
    then the looks of shapes that appear."""
    cell = size / GRID
    shapes = list(clip.start.shapes) + [e.shape for e in clip.events if isinstance(e, Appear)]
    looks = {}
    for shape in shapes:
        looks[shape.kind] = _Look(*shape_look(shape.size, cell, rng))
    return looks


def _progress(frame: int, span: tuple[int, int]) -> float:
    """0 up to the span's start, 1 from its end, linear in between."""
    a, b = span
    return min(1.0, max(0.0, (frame - a) / (b - a)))


def _state(clip: Clip, spans: tuple[tuple[int, int], ...], frame: int) -> list[tuple[str, float, float, tuple]]:
    """The shapes seen in a frame: (kind, row, col, RGB), rows and columns fractional while gliding."""
    seen = {s.kind: (s.kind, float(s.row), float(s.col), RGB[s.colour]) for s in clip.start.shapes}
    for event, span in zip(clip.events, spans, strict=True):
        p, kind = _progress(frame, span), event.shape.kind
        if isinstance(event, Move):
            to = event.moved
            seen[kind] = (kind, event.shape.row + p * (to.row - event.shape.row),
                          event.shape.col + p * (to.col - event.shape.col), seen[kind][3])
        elif isinstance(event, Recolour):
            old, new = np.array(RGB[event.shape.colour]), np.array(RGB[event.colour])
            seen[kind] = (*seen[kind][:3], tuple(int(v) for v in np.rint(old + p * (new - old))))
        elif isinstance(event, Appear) and p == 1:
            s = event.shape
            seen[kind] = (kind, float(s.row), float(s.col), RGB[s.colour])
        elif isinstance(event, Disappear) and p > 0:
            del seen[kind]
    return list(seen.values())


def _draw(background: str, shapes: list[tuple[str, float, float, tuple]], looks: dict[str, _Look],
          size: int) -> np.ndarray:
    """One frame, (size, size, 3) uint8, drawn as `world_draw.draw_scene` draws a picture."""
    image = Image.new("RGB", (size, size), BACKGROUND_RGB[background])
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for kind, row, col, fill in shapes:
        look = looks[kind]
        draw_shape(draw, kind, (col + 0.5) * cell + look.dx, (row + 0.5) * cell + look.dy, look.r, fill)
    return np.asarray(image)


def render_clip(clip: Clip, rng: random.Random, *, size: int = DEFAULT_SIZE, fps: tuple[int, int] = FPS,
                seconds: tuple[float, float] = SECONDS) -> Video:
    """Render a clip to frames.

    Args:
        clip: the clip.
        rng: draws the shapes' looks (first, as `draw_scene` would for the start scene), the frame rate, the length
            and the events' times; the same state gives the same frames.
        size: the frame side in pixels, >= MIN_SIZE (30).
        fps: (low, high) frames per second, drawn uniformly per clip.
        seconds: (low, high) clip length, drawn uniformly per clip; the shortest clip needs >= 16 frames.
    Returns:
        the `Video`: frames (n, size, size, 3) uint8, its fps and the events' spans.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIZE:
        raise InputError(f"the frame size must be an integer >= {MIN_SIZE} pixels, got {size!r}")
    check_timing(fps, seconds)
    looks = _looks(clip, size, rng)
    rate = rng.randint(*fps)
    n = round(rng.uniform(*seconds) * rate)
    spans = schedule(clip.events, n, rate, rng)
    frames = np.stack([_draw(clip.start.background, _state(clip, spans, f), looks, size) for f in range(n)])
    return Video(frames, rate, spans)  # frames: (n, size, size, 3)


def find_ffmpeg() -> str:
    """The ffmpeg executable: the one on PATH, else the one the `imageio_ffmpeg` package carries, else `InputError`."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        raise InputError("no ffmpeg to encode videos with: install one on PATH (e.g. apt-get install ffmpeg) or the "
                         "imageio-ffmpeg wheel (pip install imageio-ffmpeg), which carries one") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError("frames must be a uint8 array (n, H, W, 3) of RGB, got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}")
    n, h, w, _ = frames.shape
    if n < 1 or h < 2 or w < 2 or h % 2 or w % 2:
        raise InputError(f"frames must be at least one, of even height and width (yuv420p halves both); got "
                         f"{n} frame(s) of {h} x {w}")


def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = CRF) -> bytes:
    """Encode frames as an H.264 mp4 (libx264, yuv420p, BT.601 limited range, moov first for streaming).

    Args:
        frames: (n, H, W, 3) uint8 RGB; H and W even.
        fps: frames per second, an integer in [1, 240].
        crf: x264's constant rate factor (0 lossless … 51); CRF (15) keeps every colour of the world.
    Returns:
        the mp4 file's bytes; the same frames give the same bytes with the same ffmpeg build.
    """
    _check_frames(frames)
    if not isinstance(fps, int) or isinstance(fps, bool) or not 1 <= fps <= 240:
        raise InputError(f"fps must be an integer in [1, 240], got {fps!r}")
    if not isinstance(crf, int) or isinstance(crf, bool) or not 0 <= crf <= 51:
        raise InputError(f"crf must be an integer in [0, 51] (x264's range), got {crf!r}")
    ffmpeg = find_ffmpeg()
    n, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="mm-llama-mp4-") as tmp:
        path = os.path.join(tmp, "clip.mp4")  # +faststart rewrites the file: it needs a seekable output, not a pipe
        command = [
            ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0",
            "-vf", "scale=out_color_matrix=bt601:out_range=tv,format=yuv420p",
            "-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-colorspace", "smpte170m", "-color_primaries", "smpte170m", "-color_trc", "smpte170m",
            "-color_range", "tv",
            # One thread and bit-exact muxing: the same frames give the same bytes, so shards are reproducible.
            "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
            "-movflags", "+faststart", "-f", "mp4", path,
        ]  # fmt: skip
        done = subprocess.run(command, input=frames.tobytes(), capture_output=True)
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip()[-500:]
            raise InputError(f"{ffmpeg} could not encode {n} frames of {w} x {h} as H.264 (it needs libx264): {tail}")
        with open(path, "rb") as f:
            return f.read()
