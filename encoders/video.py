"""The video medium's input side (Llama 3 paper §7.2): sample frames uniformly over the whole clip, decode them with
decord at the size the image tiler needs, and tile every frame exactly as an image.

Sampling: `n_frames` frames (64 at fine-tuning and inference, 16 in pretraining), the centres of `n_frames` equal
segments of the clip (`uniform_indices`). A clip shorter than `n_frames` repeats frames, so every clip yields exactly
`n_frames` frames and their spacing stays uniform in time. decord gives each frame's time stamps, and we sample uniform
*time* points with them (`uniform_indices_by_time`), which is the same on constant-frame-rate clips and right on
variable-frame-rate ones; a clip whose time stamps are unusable (missing, not increasing) is sampled by index.

Decoding (`read_video`): decord runs in a worker process (`encoders.video_worker`) with a timeout, so a file that hangs
or crashes it costs an `InputError`, not the caller. Frames are decoded at the size `ImageTransform` would resize them
to (never larger than the file's own), so an 8K clip costs the memory of small frames (and of the decoder's own few
full-size pictures). decord counts packets, and may count frames that do not decode (a corrupt tail, a last frame cut
short): we then sample the frames that do. A file cut short anywhere else is refused: decord stops at the first
unreadable packet when it opens a file. Only the sampled frames are converted and returned, each distinct one once;
decord reaches each by decoding from the keyframe before it (the frames between are decoded, not converted), so 64
samples of a clip with long groups of pictures decode most of it (README, Performance: on 16 cores no faster than
decoding every frame with decord's threads; 2.7x faster on 2 cores). Opening a file reads every packet header, so
that much grows with the file's length.

Rotation: phones store portrait video as landscape frames plus a rotation in the MP4/MOV track header. decord 0.6.0
applies that rotation itself (FFmpeg 4.1's `rotate` tag: a transpose before its scale filter), so its frames come out
upright, as ffmpeg's autorotate shows them, and we must not turn them again. We read the same rotation from the
container (`encoders.video_mp4`), to know the upright size before decoding, and report it. For other containers (MKV,
WebM, AVI) we read no header: `VideoClip.rotation` is 0, the size is that of decord's first frame, and any rotation is
whatever FFmpeg's demuxer reports to decord (for those containers, normally none).

Shapes: B batch, V videos per sample, F frames per clip, N = max_tiles, T = tile size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from encoders.image_transform import (
    Images,
    ImageTransform,
    ImageTransformConfig,
    TransformedImage,
    _best_canvas,
    _fit_size,
    collate_images,
)
from encoders.video_mp4 import video_tracks
from encoders.video_worker import DecodeError, DecodeWorker
from mm_llama.errors import ConfigError, InputError
from mm_llama.paths import local_path

ACCEPTED = "a path to a video file with a video track that decord (FFmpeg 4.1) decodes: MP4, MOV, MKV, WebM, AVI, …"
MAX_BYTES = 8 << 30  # 8 GiB; decord reads every packet header of the file when it opens it
_WORKER = DecodeWorker()
_NO_TRACK, _NO_FRAMES = "has no video track (an audio-only file?)", "has a video track without frames"
# decord's words for faults that deserve a plainer message.
_DECORD_WORDS = {"cannot find video stream": "has no video stream that decord finds (audio only, or cut short?)",
                 "Invalid frame count: 0": _NO_FRAMES,
                 "av_read_frame failed": "is cut short or corrupt (decord stops at the first packet it cannot read)",
                 "Cannot create buffer source": "is cut short or corrupt (its video stream has no usable format)"}


class VideoClip(NamedTuple):
    """The sampled frames of one clip.

    frames: (F, H, W, 3) uint8, upright, at the tiler's size (see `read_video`).
    indices: the F frame indices read (non-decreasing; repeated for clips shorter than F).
    timestamps: each sampled frame's start, in seconds from the stream's start.
    fps: decord's average frame rate (frames / duration for variable-rate clips).
    n_total: frames in the clip that decode (decord's count, less an undecodable tail).
    duration_s: from the first frame's start to the last decodable frame's end.
    rotation: clockwise degrees the frames were turned to be upright (0, 90, 180, 270; 0 outside MP4/MOV).
    """

    frames: np.ndarray
    indices: list[int]
    timestamps: list[float]
    fps: float
    n_total: int
    duration_s: float
    rotation: int


def uniform_indices(n_available: int, n_frames: int) -> list[int]:
    """The centres of `n_frames` equal segments of a clip: index i = floor((i + 0.5) * n_available / n_frames).

    Args:
        n_available: frames in the clip (>= 1).
        n_frames: frames to sample (>= 1); more than `n_available` repeats frames (see the module docstring).

    Returns:
        `n_frames` non-decreasing indices in [0, n_available).
    """
    if n_available < 1 or n_frames < 1:
        raise InputError(f"uniform_indices needs n_available >= 1 and n_frames >= 1, got {n_available}, {n_frames}")
    # (2i + 1) * n // (2F) is the floor in integers: no float rounding at segment boundaries.
    return [(2 * i + 1) * n_available // (2 * n_frames) for i in range(n_frames)]


def usable_timestamps(timestamps) -> bool:
    """True if per-frame (start, end) seconds can place frames in time: finite, starts strictly increasing, a positive
    duration (decord turns a missing time stamp into a huge negative number)."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if ts.ndim != 2 or ts.shape[0] < 1 or ts.shape[1] != 2 or not np.isfinite(ts).all():
        return False
    return bool((np.diff(ts[:, 0]) > 0).all() and ts[-1, 1] > ts[0, 0])


def uniform_indices_by_time(timestamps, n_frames: int) -> list[int]:
    """The frames on screen at `n_frames` uniform points in time: the centres of `n_frames` equal segments of [first
    frame's start, last frame's end], each taking the last frame that starts at or before it.

    On a constant-rate clip (every frame as long as the others, to float32 precision) that is exactly
    `uniform_indices(len(timestamps), n_frames)`, and that integer rule is what we return: decord keeps times in
    float32, which puts points that fall on a frame's start (they do whenever (i + 0.5) * n / F is an integer) on
    either side of it.

    Args:
        timestamps: (n, 2) seconds, each frame's (start, end) in presentation order (decord's `get_frame_timestamp`);
            they must pass `usable_timestamps`.
        n_frames: frames to sample (>= 1).

    Returns:
        `n_frames` non-decreasing indices in [0, n).
    """
    if n_frames < 1 or not usable_timestamps(timestamps):
        raise InputError("uniform_indices_by_time needs n_frames >= 1 and (n, 2) finite (start, end) times with "
                         f"increasing starts; got n_frames={n_frames}, timestamps of shape {np.shape(timestamps)}")
    ts = np.asarray(timestamps, dtype=np.float64)
    starts, t0, t1 = ts[:, 0], ts[0, 0], ts[-1, 1]
    durations = np.diff(np.append(starts, t1))  # (n,)
    float32_step = float(np.finfo(np.float32).eps) * max(abs(t0), abs(t1))
    if np.ptp(durations) <= 1e-3 * np.median(durations) + 4 * float32_step:
        return uniform_indices(len(starts), n_frames)
    points = t0 + (np.arange(n_frames) + 0.5) * ((t1 - t0) / n_frames)
    return (np.searchsorted(starts, points, side="right") - 1).tolist()


def decode_size(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """(height, width) at which to decode an upright (height, width) frame for the tiler.

    That is the size `ImageTransform` resizes the frame to when it shrinks it; a frame it would enlarge is decoded at
    its own size (the tiler then enlarges it with PIL, as it does an image). The decoded frame is planned again by
    `ImageTransform`, and for a few sizes (a side that floors onto a tile edge) it would fit a smaller canvas than the
    full frame does; one more pixel on the other side keeps the full frame's canvas and tiles.
    """

    def plan(h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        canvas = _best_canvas(h, w, max_tiles, tile_size)
        return canvas, _fit_size(h, w, canvas[0] * tile_size, canvas[1] * tile_size, tile_size)

    canvas, (fit_h, fit_w) = plan(height, width)
    if fit_h * fit_w >= height * width:
        return height, width
    for size in ((fit_h, fit_w), (fit_h, fit_w + 1), (fit_h + 1, fit_w)):
        if plan(*size) == (canvas, size):
            return size
    return height, width  # not met on a dense grid of sizes and tilings; full size is always right, only dearer


def read_video(path, *, n_frames: int, tile_size: int, max_tiles: int, timeout_s: float = 30.0,
               max_bytes: int = MAX_BYTES, max_pixels: int = ImageTransformConfig.max_pixels) -> VideoClip:
    """Sample `n_frames` frames uniformly over a video file and decode them, upright, at the tiler's size.

    Args:
        path: a local video file (str or Path).
        n_frames: frames to sample (16 in pretraining, 64 at fine-tuning and inference; paper §7.2).
        tile_size, max_tiles: the image encoder's tiling; frames are decoded at the size `ImageTransform` needs.
        timeout_s: the most the decoding may take, in seconds (starting the worker process is not counted).
        max_bytes: larger files are refused before decoding.
        max_pixels: frames with more pixels are refused (from the MP4/MOV header, before decoding).

    Returns:
        A `VideoClip`: frames (n_frames, H, W, 3) uint8, indices, timestamps, fps, n_total, duration_s, rotation.

    Raises:
        InputError: a missing, empty, oversized, truncated or non-video file, a file without a video track or
            without a frame that decodes, or decoding that takes longer than `timeout_s`.
        ConfigError: a non-positive n_frames, tile_size, max_tiles or timeout_s.
    """
    config = ImageTransformConfig(tile_size=tile_size, max_tiles=max_tiles, max_pixels=max_pixels)
    if not isinstance(n_frames, int) or isinstance(n_frames, bool) or n_frames < 1:
        raise ConfigError(f"read_video: n_frames must be a positive int, got {n_frames!r}")
    if not timeout_s > 0:
        raise ConfigError(f"read_video: timeout_s must be positive, got {timeout_s!r}")
    file = _checked_file(path, max_bytes)
    call = _Calls(str(path), timeout_s)
    height, width, rotation = _upright_size(file, call)
    if height * width > config.max_pixels:
        raise InputError(f"video {path} has {width}x{height} = {width * height} pixels per frame, more than the limit "
                         f"of {config.max_pixels} (max_pixels)")
    out_h, out_w = decode_size(height, width, tile_size, max_tiles)
    meta = call("open", str(file), out_w, out_h)  # decord takes the upright size: it rotates, then scales
    frames, indices, n_total = _sample_frames(call, meta["timestamps"], meta["n_total"], n_frames)
    ts, fps = meta["timestamps"][:n_total].astype(np.float64), meta["fps"]
    if usable_timestamps(ts):
        times, duration = ts[indices, 0].tolist(), float(ts[-1, 1] - ts[0, 0])
    else:
        rate = fps if fps > 0 else float("nan")
        times, duration = [i / rate for i in indices], n_total / rate
    return VideoClip(frames, indices, times, fps, n_total, duration, rotation)


def _checked_file(path, max_bytes: int) -> Path:
    file = local_path(path, "video")
    if not file.is_file():
        raise InputError(f"video file {path} does not exist or is not a file; expected {ACCEPTED}")
    size = file.stat().st_size
    if size == 0:
        raise InputError(f"video file {path} is empty (0 bytes); expected {ACCEPTED}")
    if size > max_bytes:
        raise InputError(f"video file {path} is {size} bytes, more than the limit of {max_bytes} (max_bytes)")
    return file


class _Calls:
    """Worker calls for one file under one deadline; decord's failures become `InputError`s naming the file."""

    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self.deadline = time.monotonic() + timeout_s

    def __call__(self, op: str, *args):
        try:
            return _WORKER.call(op, *args, timeout_s=max(self.deadline - time.monotonic(), 0.0))
        except TimeoutError as e:
            raise InputError(f"video {self.name} did not decode within timeout_s={self.timeout_s:g} s (the decoder "
                             "was stopped); the file may be corrupt, or very long for that limit") from e
        except DecodeError as e:
            meaning = next((text for words, text in _DECORD_WORDS.items() if words in str(e)), None)
            if meaning is not None:
                raise InputError(f"{self.name} {meaning}; expected {ACCEPTED}") from e
            raise InputError(f"video {self.name} cannot be decoded ({e}); expected {ACCEPTED}") from e


def _upright_size(file: Path, call: _Calls) -> tuple[int, int, int]:
    """(height, width, rotation) of the frames as shown: from the MP4/MOV header, else from decord's first frame."""
    try:
        tracks = video_tracks(file)
    except OSError as e:
        raise InputError(f"video file {call.name} cannot be read: {e}") from e
    if tracks == []:
        raise InputError(f"{call.name} {_NO_TRACK}; expected {ACCEPTED}")
    if tracks and tracks[0].frames == 0:
        raise InputError(f"{call.name} {_NO_FRAMES}; expected {ACCEPTED}")
    if tracks and tracks[0].width > 0 and tracks[0].height > 0:
        track = tracks[0]
        turned = track.rotation in (90, 270)
        return (track.width, track.height, track.rotation) if turned else (track.height, track.width, track.rotation)
    height, width = call("probe", str(file))
    return height, width, 0


def _sample_frames(call: _Calls, timestamps: np.ndarray, n_total: int, n_frames: int
                   ) -> tuple[np.ndarray, list[int], int]:
    """(frames (F, H, W, 3), indices, frames that decode): each distinct frame is decoded once. When decord's count
    includes frames that do not decode, the worker finds how many do, and we sample those; the count only shrinks, and
    the deadline bounds the rounds."""
    while True:
        ts = timestamps[:n_total]
        indices = uniform_indices_by_time(ts, n_frames) if usable_timestamps(ts) else uniform_indices(n_total, n_frames)
        unique, inverse = np.unique(indices, return_inverse=True)
        frames = call("read", unique.tolist())
        if isinstance(frames, np.ndarray):
            return frames[inverse], indices, n_total  # (F, H, W, 3)
        if frames["decodable"] == 0:
            raise InputError(f"video {call.name} has no frame that decodes (corrupt or truncated); expected {ACCEPTED}")
        n_total = frames["decodable"]


@dataclass
class Videos:
    """The videos of a batch, sampled and tiled (the video medium's typed input: `mm_llama.media.Media(videos=...)`).

    pixel_values: (B, V, F, N, 3, T, T) float, each frame's normalised tiles exactly as `ImageTransform` makes them
        for an image; padding videos and empty tile slots are zeros. The model flattens (B, V, F) into the image
        encoder's image axis.
    aspect_ratio_ids: (B, V) long, 0 = padding video (all frames of a clip share one aspect ratio).
    tile_mask: (B, V, N) bool, True for the real tiles of real videos. Stays on the CPU (`to` leaves it there).
    n_videos: videos per sample (the rest of the V slots are padding).
    """

    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    tile_mask: torch.Tensor
    n_videos: list[int]

    @property
    def n_frames(self) -> int:
        """F, the frames of every clip."""
        return self.pixel_values.shape[2]

    @classmethod
    def prepare(cls, samples: list[list], *, tile_size: int, max_tiles: int, n_frames: int,
                max_videos: int | None = None, timeout_s: float = 30.0) -> Videos:
        """Video paths per sample -> the sampled, tiled batch.

        Args:
            samples: B lists of video file paths (a sample may have none).
            tile_size, max_tiles: the image encoder's tiling (`VisionConfig.tile_size` / `max_tiles`).
            n_frames: frames per clip (`VideoAdapterConfig.n_frames`).
            max_videos: the most videos a sample may have (an `InputError` beyond).
            timeout_s: per video, see `read_video`.
        """
        if max_videos is not None:
            for i, sample in enumerate(samples):
                if len(sample) > max_videos:
                    raise InputError(f"sample {i} has {len(sample)} videos, more than the {max_videos} accepted")
        transform = ImageTransform(ImageTransformConfig(tile_size=tile_size, max_tiles=max_tiles))
        clips = [[read_video(path, n_frames=n_frames, tile_size=tile_size, max_tiles=max_tiles, timeout_s=timeout_s)
                  for path in sample] for sample in samples]
        return collate_videos([[[transform(frame) for frame in clip.frames] for clip in sample] for sample in clips])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Videos:
        """Pixels (in `dtype`, if given) and aspect-ratio ids on `device`; the tile mask stays on the host."""
        return Videos(self.pixel_values.to(device, dtype), self.aspect_ratio_ids.to(device), self.tile_mask,
                      list(self.n_videos))


def collate_videos(batch: list[list[list[TransformedImage]]], max_videos: int | None = None) -> Videos:
    """Stack per-sample lists of clips (each a list of its frames' `TransformedImage`s) into padded batch tensors.

    Args:
        batch: B lists of clips (a sample may have none); every clip has the same number of frames, all frames the
            same tile size and max_tiles.
        max_videos: pad every sample to this many videos (fixed shapes); None pads to the longest sample.

    Returns:
        The `Videos` (padding videos are zeros, aspect-ratio id 0, tile mask all False).

    Raises:
        InputError: an empty batch, a sample with more than `max_videos` videos, clips with different frame counts
            or tile shapes, or a clip whose frames have different aspect ratios.
    """
    if not batch:
        raise InputError("collate_videos got an empty batch; expected a list of per-sample lists of clips")
    clips = [clip for sample in batch for clip in sample]
    lengths = {len(clip) for clip in clips}
    if len(lengths) > 1 or 0 in lengths:
        raise InputError(f"every clip of a batch needs the same, non-zero number of frames; got {sorted(lengths)}")
    for clip in clips:
        ratios = {frame.aspect_ratio_id for frame in clip}
        if len(ratios) > 1:
            raise InputError(f"the frames of a clip must share one aspect ratio; got aspect-ratio ids {sorted(ratios)}")
    if max_videos is not None:
        for i, sample in enumerate(batch):
            if len(sample) > max_videos:
                raise InputError(f"sample {i} has {len(sample)} videos, more than max_videos={max_videos}")
    # The frames as images of samples of V · F slots: collate_images pads and checks, then (B, V, F) is unflattened.
    n_frames = lengths.pop() if lengths else 1
    slots = None if max_videos is None else max_videos * n_frames
    images: Images = collate_images([[frame for clip in sample for frame in clip] for sample in batch], slots)
    B, n_slots = images.pixel_values.shape[:2]
    V = n_slots // n_frames
    pixel_values = images.pixel_values.view(B, V, n_frames, *images.pixel_values.shape[2:])  # (B, V, F, N, 3, T, T)
    aspect_ratio_ids = images.aspect_ratio_ids.view(B, V, n_frames)[:, :, 0].contiguous()  # (B, V)
    tile_mask = images.tile_mask.view(B, V, n_frames, -1)[:, :, 0].contiguous()  # (B, V, N)
    return Videos(pixel_values, aspect_ratio_ids, tile_mask, [len(sample) for sample in batch])
