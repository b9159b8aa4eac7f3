"""Video input: uniform frame sampling (by index and by time), decoding with decord in a worker (timeout, undecodable
tails, rotation, decode size), bad files, and the `Videos` batch. Every clip is made here with ffmpeg."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.image_transform import ImageTransform, ImageTransformConfig
from encoders.video import (
    _WORKER,
    Videos,
    collate_videos,
    decode_size,
    read_video,
    uniform_indices,
    uniform_indices_by_time,
    usable_timestamps,
)
from mm_llama.errors import ConfigError, InputError

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                reason="ffmpeg and ffprobe make the test videos")

TILE, MAX_TILES = 32, 4  # a 48x64 frame fits a 2x2 canvas of 32-px tiles as it is: decoded at full size
BITS = 8  # frame k shows k in binary, one vertical stripe per bit (white = 1), which survives lossy coding


def numbered_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    """(n, H, W, 3) uint8; frame k is black and white stripes spelling k."""
    bits = (np.arange(n)[:, None] >> np.arange(BITS)) & 1  # (n, BITS)
    columns = np.repeat(bits, width // BITS, axis=1).astype(np.uint8) * 255  # (n, W)
    return np.ascontiguousarray(np.broadcast_to(columns[:, None, :, None], (n, height, width, 3)))


def frame_number(frame: np.ndarray) -> int:
    """The k a decoded frame spells (read at the centre of each stripe, at whatever size it was decoded)."""
    centres = ((np.arange(BITS) + 0.5) * frame.shape[1] / BITS).astype(int)
    bits = frame[:, centres].mean(axis=(0, 2)) > 127
    return int((bits << np.arange(BITS)).sum())


def encode(path: Path, frames: np.ndarray, fps: float, *args: str) -> Path:
    """Raw RGB frames through a pipe into ffmpeg with the given output options."""
    n, height, width, _ = frames.shape
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                    "-r", str(fps), "-i", "-", *args, str(path)], input=frames.tobytes(), check=True)
    return path


def h264(path: Path, frames: np.ndarray, fps: float = 25, *args: str) -> Path:
    return encode(path, frames, fps, "-c:v", "libx264", "-pix_fmt", "yuv420p", *args)


def ffprobe(path: Path, entries: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", entries, "-of", "json",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident memory (VmHWM in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


# --- sampling rules ---------------------------------------------------------------------------------------------------


def test_uniform_indices_are_segment_centres():
    assert uniform_indices(100, 16) == [3, 9, 15, 21, 28, 34, 40, 46, 53, 59, 65, 71, 78, 84, 90, 96]
    assert uniform_indices(64, 64) == list(range(64))
    assert uniform_indices(1, 3) == [0, 0, 0]
    for n in range(1, 130):
        for f in (1, 7, 16, 64):
            assert uniform_indices(n, f) == [int(np.floor((i + 0.5) * n / f + 1e-9)) for i in range(f)], (n, f)
    # Shorter than n_frames: every frame is used, each 2 or 3 times for 7 -> 16, in order.
    short = uniform_indices(7, 16)
    assert short == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 6, 6]
    assert sorted(set(short)) == list(range(7)) and set(np.bincount(short)) == {2, 3}
    with pytest.raises(InputError, match="n_available >= 1"):
        uniform_indices(0, 16)


def test_time_sampling_equals_index_sampling_at_a_constant_rate():
    # decord's float32 stamps, clips that start late and an hour-long one: the time rule must give the integer rule.
    for fps in (10, 24, 25, 29.97, 30, 60):
        for start in (0.0, 12.3):
            for n in (*range(1, 140), 108_000):
                k = np.arange(n)
                ts = np.stack([start + k / fps, start + (k + 1) / fps], axis=1).astype(np.float32)
                for f in (1, 7, 16, 64):
                    assert uniform_indices_by_time(ts, f) == uniform_indices(n, f), (fps, start, n, f)


def test_time_sampling_of_a_variable_rate_clip():
    # 20 frames of 0.05 s, then 5 of 1 s: 6 s in all; points at 0.5, 1.5, ... 5.5 s.
    starts = np.concatenate([np.arange(20) * 0.05, 1.0 + np.arange(5)])
    ts = np.stack([starts, np.append(starts[1:], 6.0)], axis=1)
    assert uniform_indices_by_time(ts, 6) == [10, 20, 21, 22, 23, 24]
    assert uniform_indices(25, 6) == [2, 6, 10, 14, 18, 22]  # by index, 4 of 6 would come from the first second
    assert usable_timestamps(ts)
    for bad in (ts[::-1], np.zeros((5, 2)), np.full((3, 2), np.nan), ts[:, :1]):
        assert not usable_timestamps(bad)
        with pytest.raises(InputError, match="increasing starts"):
            uniform_indices_by_time(bad, 4)


# --- decoding ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fps, n_frames, codec", [(7, 10, 16, "libx264"), (16, 25, 16, "libx264"),
                                                     (50, 30, 16, "mpeg4"), (64, 25, 64, "libx264"),
                                                     (100, 30, 16, "libx264"), (100, 10, 64, "mpeg4")])
def test_read_video_decodes_the_uniformly_sampled_frames(tmp_path, n, fps, n_frames, codec):
    path = encode(tmp_path / "clip.mp4", numbered_frames(n), fps, "-c:v", codec, "-pix_fmt", "yuv420p", "-q:v", "2")
    clip = read_video(path, n_frames=n_frames, tile_size=TILE, max_tiles=MAX_TILES)
    assert clip.indices == uniform_indices(n, n_frames)
    assert clip.frames.shape == (n_frames, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert [frame_number(frame) for frame in clip.frames] == clip.indices  # the frames really are those frames
    assert clip.n_total == n and clip.fps == pytest.approx(fps) and clip.duration_s == pytest.approx(n / fps, abs=1e-4)
    assert clip.timestamps == pytest.approx([i / fps for i in clip.indices], abs=1e-4)
    assert clip.rotation == 0


def test_a_short_clip_repeats_frames(tmp_path):
    clip = read_video(h264(tmp_path / "short.mp4", numbered_frames(5)), n_frames=16, tile_size=TILE,
                      max_tiles=MAX_TILES)
    assert clip.indices == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4]  # each frame 3 or 4 times, in order
    assert [frame_number(frame) for frame in clip.frames] == clip.indices
    assert np.array_equal(clip.frames[0], clip.frames[2]) and np.array_equal(clip.frames[13], clip.frames[15])


def test_a_variable_frame_rate_clip_is_sampled_uniformly_in_time(tmp_path):
    # 20 frames 0.04 s apart, then 10 frames 0.2 s apart: index sampling would spend most frames on the first 0.8 s.
    path = encode(tmp_path / "vfr.mp4", numbered_frames(30), 25, "-vf",
                  "setpts='if(lt(N,20),N*0.04,0.8+(N-20)*0.2)/TB'", "-fps_mode", "passthrough",
                  "-c:v", "libx264", "-pix_fmt", "yuv420p")
    packets = ffprobe(path, "packet=pts_time,duration_time")["packets"]
    truth = np.array(sorted((float(p["pts_time"]), float(p["pts_time"]) + float(p["duration_time"]))
                            for p in packets))
    assert truth[19, 0] == pytest.approx(0.76) and truth[20, 0] == pytest.approx(0.8)  # the file is what we meant
    assert truth[21, 0] - truth[20, 0] == pytest.approx(0.2)
    clip = read_video(path, n_frames=8, tile_size=TILE, max_tiles=MAX_TILES)
    assert clip.indices == uniform_indices_by_time(truth, 8) == [4, 12, 20, 21, 23, 25, 26, 28]
    assert clip.indices != uniform_indices(30, 8)
    assert [frame_number(frame) for frame in clip.frames] == clip.indices
    assert clip.timestamps == pytest.approx(truth[clip.indices, 0].tolist(), abs=1e-4)
    # Each time point lies on the frame that is on screen then.
    points = truth[0, 0] + (np.arange(8) + 0.5) * (truth[-1, 1] - truth[0, 0]) / 8
    assert all(truth[i, 0] <= p < truth[i + 1, 0] for i, p in zip(clip.indices, points, strict=True))


@pytest.mark.parametrize("tag", [90, 180, 270])
def test_a_rotated_clip_comes_out_upright(tmp_path, tag):
    picture = np.zeros((64, 96, 3), dtype=np.uint8)  # landscape as stored: white top-left, grey top-right
    picture[:16, :16], picture[:16, -16:] = 255, 128
    source = h264(tmp_path / "source.mp4", np.stack([picture] * 3), 10)
    path = tmp_path / "rotated.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-c", "copy", "-metadata:s:v:0", f"rotate={tag}",
                    str(path)], check=True)
    # What the file really holds: ffprobe's display-matrix angle is counterclockwise (ffmpeg 5.1 writes the `rotate`
    # tag the other way round, so this is not `tag`).
    (stream,) = ffprobe(path, "stream_side_data=rotation")["streams"]
    clockwise = -int(stream["side_data_list"][0]["rotation"]) % 360
    assert clockwise in (90, 180, 270)
    # Upright, as ffmpeg's own autorotate shows it.
    shown = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "image2pipe", "-c:v",
                            "png", "-"], capture_output=True, check=True).stdout
    upright = np.asarray(Image.open(io.BytesIO(shown)).convert("RGB"))
    assert np.array_equal(upright.shape, np.rot90(picture, -clockwise // 90).shape)

    clip = read_video(path, n_frames=2, tile_size=64, max_tiles=MAX_TILES)  # fits a 2x2 canvas: full size
    assert clip.rotation == clockwise
    assert clip.frames.shape[1:] == upright.shape
    assert np.abs(clip.frames[0].astype(int) - upright).mean() < 3
    assert np.abs(clip.frames[0].astype(int) - np.rot90(picture, -clockwise // 90)).mean() < 6
    # Decoded smaller, the size is the upright frame's: (96, 64) fits 2x2 tiles of 32 as (64, 42).
    small = read_video(path, n_frames=2, tile_size=32, max_tiles=MAX_TILES)
    assert small.frames.shape[1:3] == ((42, 64) if clockwise == 180 else (64, 42))


def test_decode_size_is_the_size_the_tiler_resizes_to():
    assert decode_size(4320, 7680, 560, 4) == (630, 1120)
    assert decode_size(48, 64, TILE, MAX_TILES) == (48, 64)  # fits as it is
    assert decode_size(10, 10, 560, 4) == (10, 10)  # the tiler enlarges: decode at the file's size
    transform = ImageTransform(ImageTransformConfig(tile_size=16, max_tiles=4))
    shrunk = 0
    for height in range(1, 150, 7):
        for width in range(1, 150, 5):
            h, w = decode_size(height, width, 16, 4)
            full = transform(np.full((height, width, 3), 255, dtype=np.uint8))
            decoded = transform(np.full((h, w, 3), 255, dtype=np.uint8))
            assert decoded.aspect_ratio_id == full.aspect_ratio_id, (height, width)  # the same canvas and tiles
            if (h, w) != (height, width):  # shrunk: to the size the tiler shrinks to (+1 on one side, see decode_size)
                fh, fw = white_extent(full)
                assert 0 <= h - fh <= 1 and 0 <= w - fw <= 1 and h * w < height * width, (height, width)
                assert white_extent(decoded) == (h, w)  # and the tiler does not resize the decoded frame again
                shrunk += 1
    assert shrunk > 300
    # A size where the frame shrunk as the tiler shrinks it would fit a smaller canvas: one more pixel keeps the full
    # frame's (2x2 tiles of 32, where (32, 64) alone would take 1x2).
    transform = ImageTransform(ImageTransformConfig(tile_size=32, max_tiles=4))
    full, plain = transform(np.zeros((57, 111, 3), np.uint8)), transform(np.zeros((32, 64, 3), np.uint8))
    assert full.aspect_ratio == (2, 2) and plain.aspect_ratio == (1, 2)
    assert decode_size(57, 111, 32, 4) == (33, 64)
    assert transform(np.zeros((33, 64, 3), np.uint8)).aspect_ratio == (2, 2)


def white_extent(image) -> tuple[int, int]:
    """Rows and columns of a tiled all-white picture that are picture, not padding (white normalises above 0)."""
    (h, w), tile = image.aspect_ratio, image.tiles.shape[-1]
    canvas = image.tiles[:h * w].reshape(h, w, 3, tile, tile).permute(2, 0, 3, 1, 4).reshape(3, h * tile, w * tile)
    white = canvas[0] > 0
    return int(white.any(1).sum()), int(white.any(0).sum())


def test_an_8k_clip_is_decoded_small(tmp_path):
    path = tmp_path / "8k.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=gray:s=7680x4320:r=10:d=0.3",
                    "-c:v", "libx264", "-preset", "ultrafast", "-threads", "1", "-pix_fmt", "yuv420p", str(path)],
                   check=True)
    _WORKER.stop()  # a fresh worker, so that its peak memory is this clip's
    start = time.monotonic()
    clip = read_video(path, n_frames=16, tile_size=560, max_tiles=4)
    elapsed = time.monotonic() - start
    assert clip.frames.shape == (16, 630, 1120, 3) and clip.n_total == 3
    # 16 full-size RGB frames alone would be 16 * 99.5 MB = 1.6 GB; the decoder's own 8K frames are the rest.
    assert peak_rss_bytes(_WORKER.pid) < 800 << 20
    assert elapsed < 15


def test_decoding_cost_does_not_grow_with_the_clip_length(tmp_path):
    path = tmp_path / "long.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=s=320x240:r=30:d=50", "-c:v",
                    "libx264", "-preset", "ultrafast", "-g", "15", "-pix_fmt", "yuv420p", str(path)], check=True)
    read_video(path, n_frames=2, tile_size=TILE, max_tiles=MAX_TILES)  # the worker is up, the file in the page cache
    start = time.monotonic()
    clip = read_video(path, n_frames=16, tile_size=TILE, max_tiles=MAX_TILES)
    sampled = time.monotonic() - start
    start = time.monotonic()
    every = read_video(path, n_frames=1500, tile_size=TILE, max_tiles=MAX_TILES)  # small frames: the cost is decoding
    decoded_all = time.monotonic() - start
    assert clip.n_total == every.n_total == 1500 and every.indices == list(range(1500))
    # 16 frames, each a seek to a keyframe (every 15 frames) and at most 14 more: about 8% of the clip's frames.
    assert sampled < 0.4 * decoded_all, (sampled, decoded_all)


def test_a_tail_that_does_not_decode_is_left_out(tmp_path):
    import decord

    path = h264(tmp_path / "clip.mp4", numbered_frames(50), 25, "-movflags", "+faststart")
    packets = ffprobe(path, "packet=pos,size")["packets"]
    data = bytearray(path.read_bytes())
    for p in packets[-5:]:  # the last 5 frames' data zeroed: the container still lists 50 frames
        data[int(p["pos"]):int(p["pos"]) + int(p["size"])] = bytes(int(p["size"]))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    assert len(decord.VideoReader(str(broken))) == 50  # decord over-reports: it counts packets
    with pytest.raises(decord.DECORDError):
        decord.VideoReader(str(broken)).get_batch([49])
    clip = read_video(broken, n_frames=16, tile_size=TILE, max_tiles=MAX_TILES)
    assert 30 <= clip.n_total <= 45  # frames just before the damage need it too (B-frames), and decord races
    assert clip.indices == uniform_indices(clip.n_total, 16)
    assert [frame_number(frame) for frame in clip.frames] == clip.indices  # real frames, not garbage
    cut = tmp_path / "cut.mp4"  # cut inside the last frame's data
    cut.write_bytes(path.read_bytes()[:int(packets[-1]["pos"]) + 2])
    clip = read_video(cut, n_frames=50, tile_size=TILE, max_tiles=MAX_TILES)
    assert 40 <= clip.n_total < 50 and [frame_number(f) for f in clip.frames] == clip.indices


def bad_inputs(tmp_path: Path) -> list[tuple[str, Path, str, dict]]:
    """(case, path, what the message must say, extra read_video arguments)."""
    clip = h264(tmp_path / "clip.mp4", numbered_frames(20), 25, "-movflags", "+faststart")
    at_end = h264(tmp_path / "moov_at_end.mp4", numbered_frames(20), 25)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(clip.read_bytes()[:clip.stat().st_size * 6 // 10])
    (tmp_path / "truncated_end.mp4").write_bytes(at_end.read_bytes()[:at_end.stat().st_size * 6 // 10])
    Image.new("RGB", (32, 32), "red").save(tmp_path / "photo.mp4", format="JPEG")
    for name in ("audio.m4a", "audio.mp4", "audio.wav"):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=d=1", str(tmp_path / name)],
                       check=True)
    data = bytearray(clip.read_bytes())  # a video track whose sample tables list no frame
    for box, offset in [(b"stts", 4), (b"stss", 4), (b"stsc", 4), (b"stco", 4), (b"stsz", 8)]:
        at = data.find(box) + 4 + offset
        data[at:at + 4] = bytes(4)
    (tmp_path / "no_frames.mp4").write_bytes(bytes(data))
    cannot = "cannot be decoded .*; expected a path to a video file"
    return [("missing", tmp_path / "missing.mp4", "does not exist or is not a file", {}),
            ("directory", tmp_path, "does not exist or is not a file", {}),
            ("empty", tmp_path / "empty.mp4", r"is empty \(0 bytes\)", {}),
            ("truncated", tmp_path / "truncated.mp4", "is cut short or corrupt|cannot be decoded", {}),
            ("truncated, index at the end", tmp_path / "truncated_end.mp4", r"without its index \(no 'moov' box\)", {}),
            ("a JPEG", tmp_path / "photo.mp4", cannot, {}),
            ("audio only, m4a", tmp_path / "audio.m4a", "has no video track", {}),
            ("audio only, mp4", tmp_path / "audio.mp4", "has no video track", {}),
            ("audio only, wav", tmp_path / "audio.wav", "has no video stream that decord finds", {}),
            ("no frames", tmp_path / "no_frames.mp4", "has a video track without frames", {}),
            ("too large", clip, r"bytes, more than the limit of 1000 \(max_bytes\)", {"max_bytes": 1000}),
            ("too many pixels", clip, r"pixels per frame, more than the limit of 100 \(max_pixels\)",
             {"max_pixels": 100})]


def test_bad_inputs_give_a_clear_error_quickly(tmp_path):
    for case, path, message, extra in bad_inputs(tmp_path):
        start = time.monotonic()
        with pytest.raises(InputError, match=message) as error:
            read_video(path, n_frames=8, tile_size=TILE, max_tiles=MAX_TILES, **extra)
        assert str(path) in str(error.value), case
        assert time.monotonic() - start < 5, case
    with pytest.raises(InputError, match="URLs are not fetched"):
        read_video("https://example.com/clip.mp4", n_frames=8, tile_size=TILE, max_tiles=MAX_TILES)
    for bad in ({"n_frames": 0}, {"tile_size": 0}, {"timeout_s": 0}):
        with pytest.raises(ConfigError):
            read_video(tmp_path / "clip.mp4", **{"n_frames": 8, "tile_size": TILE, "max_tiles": MAX_TILES, **bad})


def test_a_slow_decode_is_stopped_and_the_worker_restarts(tmp_path):
    path = h264(tmp_path / "clip.mp4", numbered_frames(30), 25)
    read_video(path, n_frames=4, tile_size=TILE, max_tiles=MAX_TILES)
    pid = _WORKER.pid
    start = time.monotonic()
    with pytest.raises(InputError, match=rf"{path} did not decode within timeout_s=0.0001 s"):
        read_video(path, n_frames=4, tile_size=TILE, max_tiles=MAX_TILES, timeout_s=1e-4)
    assert time.monotonic() - start < 2
    assert _WORKER.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    clip = read_video(path, n_frames=4, tile_size=TILE, max_tiles=MAX_TILES)  # a new worker
    assert [frame_number(f) for f in clip.frames] == uniform_indices(30, 4) and _WORKER.pid not in (None, pid)
    os.kill(_WORKER.pid, signal.SIGKILL)  # a worker that died between calls is replaced too
    time.sleep(0.1)
    assert read_video(path, n_frames=4, tile_size=TILE, max_tiles=MAX_TILES).indices == uniform_indices(30, 4)


def test_a_forked_child_uses_its_own_worker(tmp_path):
    path = h264(tmp_path / "clip.mp4", numbered_frames(30), 25)
    read_video(path, n_frames=4, tile_size=TILE, max_tiles=MAX_TILES)
    parent_worker = _WORKER.pid
    child = os.fork()  # as a data loader does: its reads must not answer through the parent's pipe
    if child == 0:
        ok = False
        try:
            clip = read_video(path, n_frames=4, tile_size=TILE, max_tiles=MAX_TILES)
            ok = clip.indices == uniform_indices(30, 4) and _WORKER.pid not in (None, parent_worker)
            _WORKER.stop()
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(child, 0)[1] == 0
    assert _WORKER.pid == parent_worker
    assert read_video(path, n_frames=4, tile_size=TILE, max_tiles=MAX_TILES).indices == uniform_indices(30, 4)


# --- the batch --------------------------------------------------------------------------------------------------------


def test_videos_prepare_tiles_each_frame_as_an_image(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(10, 48, 64, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, size=(6, 70, 30, 3), dtype=np.uint8)
    # Lossless clips, so that a decoded frame is the picture: one MP4 (size from its header), one Matroska (from
    # decord's first frame).
    a = encode(tmp_path / "a.mp4", wide, 25, "-c:v", "libx264rgb", "-qp", "0")
    b = encode(tmp_path / "b.mkv", tall, 25, "-c:v", "ffv1")
    videos = Videos.prepare([[a], [], [b]], tile_size=TILE, max_tiles=MAX_TILES, n_frames=4)
    transform = ImageTransform(ImageTransformConfig(tile_size=TILE, max_tiles=MAX_TILES))
    assert videos.pixel_values.shape == (3, 1, 4, MAX_TILES, 3, TILE, TILE) and videos.n_frames == 4
    assert videos.n_videos == [1, 0, 1]
    for row, pictures in ((0, wide), (2, tall)):
        images = [transform(pictures[i]) for i in uniform_indices(len(pictures), 4)]
        for f, image in enumerate(images):
            assert torch.equal(videos.pixel_values[row, 0, f], image.tiles), (row, f)  # bit for bit
        assert videos.aspect_ratio_ids[row].tolist() == [images[0].aspect_ratio_id]
        assert torch.equal(videos.tile_mask[row, 0], images[0].tile_mask)
    assert videos.aspect_ratio_ids.tolist() == [[6], [0], [7]]  # 2x2 tiles for 48x64, 3x1 for 70x30
    assert videos.tile_mask[1].sum() == 0 and videos.pixel_values[1].abs().max() == 0
    moved = videos.to("cpu", torch.float16)
    assert moved.pixel_values.dtype == torch.float16 and moved.tile_mask is videos.tile_mask
    assert moved.aspect_ratio_ids.dtype == torch.long
    with pytest.raises(InputError, match="sample 0 has 2 videos, more than the 1 accepted"):
        Videos.prepare([[a, a]], tile_size=TILE, max_tiles=MAX_TILES, n_frames=4, max_videos=1)


def test_a_frame_decoded_small_keeps_the_pictures_tiles(tmp_path):
    # A smooth picture larger than the canvas: decord shrinks it (bicubic), the image path with PIL (bilinear).
    y, x = np.mgrid[0:100, 0:150]
    picture = np.stack([x * 255 // 149, y * 255 // 99, (x + y) * 255 // 248], axis=-1).astype(np.uint8)
    path = encode(tmp_path / "big.mp4", np.stack([picture] * 3), 25, "-c:v", "libx264rgb", "-qp", "0")
    clip = read_video(path, n_frames=2, tile_size=TILE, max_tiles=MAX_TILES)
    assert clip.frames.shape[1:3] == decode_size(100, 150, TILE, MAX_TILES) == (42, 64)
    transform = ImageTransform(ImageTransformConfig(tile_size=TILE, max_tiles=MAX_TILES))
    frame, image = transform(clip.frames[0]), transform(picture)
    assert frame.aspect_ratio == image.aspect_ratio and torch.equal(frame.tile_mask, image.tile_mask)
    assert (frame.tiles - image.tiles).abs().mean() < 0.02  # about 1/255 of the range, after normalisation


def test_collate_videos_pads_and_checks():
    transform = ImageTransform(ImageTransformConfig(tile_size=TILE, max_tiles=MAX_TILES))
    wide, tall = transform(np.zeros((48, 64, 3), np.uint8)), transform(np.zeros((70, 30, 3), np.uint8))
    batch = collate_videos([[[wide] * 3, [tall] * 3], []], max_videos=3)
    assert batch.pixel_values.shape == (2, 3, 3, MAX_TILES, 3, TILE, TILE) and batch.n_videos == [2, 0]
    assert batch.aspect_ratio_ids.tolist() == [[6, 7, 0], [0, 0, 0]]
    assert batch.tile_mask.tolist()[0] == [[True] * 4, [True] * 3 + [False], [False] * 4]
    assert torch.equal(batch.pixel_values[0, 1, 2], tall.tiles)
    with pytest.raises(InputError, match="same, non-zero number of frames"):
        collate_videos([[[wide] * 3], [[wide] * 2]])
    with pytest.raises(InputError, match="share one aspect ratio"):
        collate_videos([[[wide, tall]]])
    with pytest.raises(InputError, match="more than max_videos=1"):
        collate_videos([[[wide], [wide]]], max_videos=1)
    with pytest.raises(InputError, match="empty batch"):
        collate_videos([])
