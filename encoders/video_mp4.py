"""A small, bounded ISO-BMFF (MP4/MOV/M4V/3GP) reader: the video tracks' size and rotation, before any decoding.

Phones record portrait video as landscape frames plus a rotation in the track header's display matrix
(`moov/trak/tkhd`, combined with the movie header's `moov/mvhd`). `encoders.video` needs the frame size and rotation
to choose the decode size without decoding a frame, and ffprobe must not be needed at runtime, so we read the boxes
ourselves. The reader only seeks between box headers and reads a few hundred bytes of the boxes it needs; it stops after
`MAX_BOXES` boxes, so a hostile file costs bounded time and memory.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple

from mm_llama.errors import InputError

MAX_BOXES = 10_000
# Box types that may open an ISO-BMFF / QuickTime file; anything else is not one.
_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp"}
# Bytes of times, ids and durations before the matrix, in box version 0 and 1.
_TIMED_FIELDS = {b"tkhd": (20, 32), b"mvhd": (16, 28)}
_IDENTITY = (1.0, 0.0, 0.0, 1.0)  # (a, b, c, d) of the display matrix; the translation plays no part in rotation


class VideoTrack(NamedTuple):
    """A video track's header: width and height as stored (before rotation), rotation in degrees clockwise, and the
    number of frames in its sample table (None for a fragmented file, whose frames are listed outside `moov`)."""

    width: int
    height: int
    rotation: int
    frames: int | None


class _Box(NamedTuple):
    type: bytes
    start: int  # first payload byte
    end: int  # one past the last byte


def video_tracks(path: Path) -> list[VideoTrack] | None:
    """The video tracks of an ISO-BMFF file, in file order.

    Returns:
        None if the file is not ISO-BMFF; [] if it has no video track (an audio-only .m4a/.mp4); else one
        `VideoTrack` per video track.

    Raises:
        InputError: an ISO-BMFF file without its index (`moov`), which most often means a recording or download cut
            short before the index was written at its end.
    """
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        budget = [MAX_BOXES]
        top = _children(f, 0, size, budget)
        if not top or top[0].type not in _FIRST_BOXES:
            return None
        moov = next((box for box in top if box.type == b"moov"), None)
        if moov is None:
            raise InputError(f"{path} is an MP4/MOV file without its index (no 'moov' box): it was cut short, or is "
                             "still being written")
        inside = _children(f, moov.start, moov.end, budget)
        mvhd = next((box for box in inside if box.type == b"mvhd"), None)
        movie = _matrix(f, mvhd) if mvhd else _IDENTITY
        fragmented = any(box.type == b"mvex" for box in inside)
        return [track for box in inside if box.type == b"trak"
                for track in [_video_track(f, box, movie, fragmented, budget)] if track is not None]


def _children(f: BinaryIO, start: int, end: int, budget: list[int]) -> list[_Box]:
    """The boxes in [start, end): header by header, stopping at the first malformed one or when the budget is spent."""
    boxes, pos = [], start
    while pos + 8 <= end and budget[0] > 0:
        budget[0] -= 1
        f.seek(pos)
        raw = f.read(8)
        if len(raw) < 8:  # the file shrank since we measured it
            break
        (size, kind), header = struct.unpack(">I4s", raw), 8
        if size == 1:  # a 64-bit size follows the type
            raw = f.read(8)
            if len(raw) < 8:
                break
            size, header = struct.unpack(">Q", raw)[0], 16
        elif size == 0:  # the box runs to the end of its container
            size = end - pos
        if size < header or pos + size > end:
            if kind == b"mdat":  # a file cut short inside its media data still has the boxes before it
                boxes.append(_Box(kind, pos + header, end))
            break
        boxes.append(_Box(kind, pos + header, pos + size))
        pos += size
    return boxes


def _video_track(f: BinaryIO, trak: _Box, movie: tuple, fragmented: bool, budget: list[int]) -> VideoTrack | None:
    tkhd = _child(f, trak, b"tkhd", budget)
    mdia = _child(f, trak, b"mdia", budget)
    hdlr = _child(f, mdia, b"hdlr", budget) if mdia else None
    # hdlr: version/flags (4), pre_defined (4; QuickTime's component type), handler type (4; 'vide' for video).
    if tkhd is None or hdlr is None or _read(f, hdlr, 8, 4) != b"vide":
        return None
    raw = _read(f, tkhd, _matrix_offset(f, tkhd) + 36, 8)  # width and height (16.16 fixed point) follow the matrix
    if len(raw) < 8:
        return None
    width, height = (v >> 16 for v in struct.unpack(">II", raw))
    return VideoTrack(width, height, _rotation(_multiply(_matrix(f, tkhd), movie)),
                      None if fragmented else _sample_count(f, mdia, budget))


def _child(f: BinaryIO, box: _Box, kind: bytes, budget: list[int]) -> _Box | None:
    return next((child for child in _children(f, box.start, box.end, budget) if child.type == kind), None)


def _sample_count(f: BinaryIO, mdia: _Box, budget: list[int]) -> int | None:
    """Frames in mdia/minf/stbl's sample size table (stsz or stz2: version/flags, size fields, then the count)."""
    minf = _child(f, mdia, b"minf", budget)
    stbl = _child(f, minf, b"stbl", budget) if minf else None
    sizes = (_child(f, stbl, b"stsz", budget) or _child(f, stbl, b"stz2", budget)) if stbl else None
    raw = _read(f, sizes, 8, 4) if sizes else b""
    return struct.unpack(">I", raw)[0] if raw else None


def _read(f: BinaryIO, box: _Box, offset: int, n: int) -> bytes:
    if box.start + offset + n > box.end:
        return b""
    f.seek(box.start + offset)
    return f.read(n)


def _matrix_offset(f: BinaryIO, box: _Box) -> int:
    """Where the display matrix starts in a tkhd or mvhd payload: after version/flags (4), the fields whose size
    depends on the version (`_TIMED_FIELDS`), and 16 bytes (tkhd: reserved, layer, alternate group, volume, reserved;
    mvhd: rate, volume, reserved)."""
    version = _read(f, box, 0, 1)
    return 4 + _TIMED_FIELDS[box.type][version == b"\x01"] + 16


def _matrix(f: BinaryIO, box: _Box) -> tuple[float, float, float, float]:
    """(a, b, c, d) of the display matrix in a tkhd or mvhd box (identity if the box is too short)."""
    raw = _read(f, box, _matrix_offset(f, box), 20)
    if len(raw) < 20:
        return _IDENTITY
    a, b, _, c, d = struct.unpack(">5i", raw)
    return a / 65536, b / 65536, c / 65536, d / 65536


def _multiply(m: tuple, n: tuple) -> tuple[float, float, float, float]:
    """m then n, both in ISO-BMFF's row-vector convention ([x y 1] · M): FFmpeg's track matrix × movie matrix."""
    a, b, c, d = m
    p, q, r, s = n
    return a * p + b * r, a * q + b * s, c * p + d * r, c * q + d * s


def _rotation(matrix: tuple) -> int:
    """The clockwise angle decord 0.6.0 turns frames by for this matrix (0, 90, 180 or 270).

    decord reads FFmpeg 4.1's `rotate` tag: -av_display_rotation_get(matrix) in [0, 360), printed with "%g", and
    truncated to an int; it applies exactly 90, 180 and 270 and nothing else. We compute the same number, so that the
    size we ask decord for and the rotation we report are the ones it applies.
    """
    a, b, c, d = matrix
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x == 0 or scale_y == 0 or matrix == _IDENTITY:
        return 0
    theta = math.degrees(math.atan2(b / scale_y, a / scale_x)) % 360
    theta = int(float(f"{theta:g}"))
    return theta if theta in (90, 180, 270) else 0
