"""Our video sampler against decoding every frame: frames/s of `read_video` (64 frames sampled uniformly over the
clip, each distinct one decoded once, at the tiler's size, by decord in a worker process) and of decord decoding
every frame of the same file at full size in this process (`decord.VideoReader(path).get_batch(range(len))`, the
peer: what a loader that decodes the whole clip and then picks frames pays), side by side, on a long clip.

    python benchmarks/video_sampler.py --make .exp/s7/media/testsrc2_30s_360p.mp4   # where ffmpeg is: the clip
    python benchmarks/video_sampler.py --video .exp/s7/media/testsrc2_30s_360p.mp4 --json sampler.json

Everything here runs on the CPU (decord's wheel decodes on the CPU); on a GPU machine it measures its host. --make
writes ffmpeg's lavfi testsrc2 (a moving test pattern) as H.264 (libx264, yuv420p, x264's defaults: a keyframe
every --keyint frames at most) of --seconds at --fps and --size.

Rows, interleaved per repeat (median of --repeats after --warmup):
    ours            read_video(n_frames=64) at the tiler's size (--tile-size, --max-tiles), worker, 1 decoder thread;
                    opening the file (every packet header) included, starting the worker not
    decord all      every frame, full size, decord's default threads (0: FFmpeg picks, one per core)
    decord all, 1t  every frame, full size, 1 decoder thread (the worker's setting)
    decord 64, 1t   the same 64 frames as ours, full size, in this process, 1 thread (ours without the worker and
                    the resize: what sampling alone saves)
"delivered/s" counts the frames a row returns; "useful/s" counts only the 64 sampled frames a model reads; "x" is a
row's useful/s over the peer's ("decord all").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from encoders.video import read_video, uniform_indices_by_time, usable_timestamps
from mm_llama.errors import InputError


def make_clip(path: Path, seconds: float, fps: int, size: str, keyint: int) -> None:
    """ffmpeg's testsrc2 as H.264 at `path`."""
    from mm_llama.data.world_video import find_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    command = [find_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", str(keyint), "-movflags", "+faststart", str(path)]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, help="the clip to decode")
    parser.add_argument("--make", type=Path, help="write a testsrc2 clip to this path with ffmpeg and exit")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of a made clip")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of a made clip")
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of a made clip")
    parser.add_argument("--keyint", type=int, default=250, help="most frames between keyframes of a made clip "
                        "(250: x264's default)")
    parser.add_argument("--n-frames", type=int, default=64, help="frames the sampler takes (64 at inference)")
    parser.add_argument("--tile-size", type=int, default=560, help="the tiler's tile size (560: 11B-Vision)")
    parser.add_argument("--max-tiles", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.make is not None:
        try:
            make_clip(args.make, args.seconds, args.fps, args.size, args.keyint)
        except InputError as e:
            parser.error(f"--make: {e}")
        print(f"wrote {args.make} ({args.make.stat().st_size / 1e6:.2f} MB)")
        return
    if args.video is None or not args.video.is_file():
        parser.error(f"give --video PATH of a video file (got {args.video}; make one with --make PATH where ffmpeg is)")
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1 (the first run starts the decoder worker)")
    import decord

    path = str(args.video)
    probe = decord.VideoReader(path, num_threads=1)
    n_total, height, width = len(probe), *probe[0].shape[:2]
    timestamps = np.asarray(probe.get_frame_timestamp(np.arange(n_total)))
    keyframes = len(probe.get_key_indices())
    del probe
    # The frames read_video picks, for the in-process row (the same rule: encoders.video._sample_frames).
    indices = uniform_indices_by_time(timestamps, args.n_frames) if usable_timestamps(timestamps) else None
    distinct = sorted(set(indices)) if indices is not None else None

    def ours():
        return read_video(path, n_frames=args.n_frames, tile_size=args.tile_size, max_tiles=args.max_tiles).frames

    def decord_all(threads: int):
        def run():
            reader = decord.VideoReader(path, num_threads=threads)
            return reader.get_batch(list(range(len(reader)))).asnumpy()
        return run

    def decord_sampled():
        return decord.VideoReader(path, num_threads=1).get_batch(distinct).asnumpy()

    rows = {"ours": ours, "decord all": decord_all(0), "decord all, 1t": decord_all(1)}
    if distinct is not None:
        rows["decord 64, 1t"] = decord_sampled
    times: dict[str, list[float]] = {name: [] for name in rows}
    shapes = {}
    for r in range(args.warmup + args.repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            frames = fn()
            elapsed = time.perf_counter() - start
            shapes[name] = frames.shape
            del frames
            if r >= args.warmup:
                times[name].append(elapsed)
        if r >= args.warmup:
            print(f"run {r - args.warmup + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  flush=True)

    results = {}
    for name, values in times.items():
        wall = statistics.median(values)
        results[name] = {"wall_s": wall, "frames": shapes[name][0], "frame_hw": list(shapes[name][1:3]),
                         "delivered_per_s": shapes[name][0] / wall, "useful_per_s": args.n_frames / wall,
                         "runs_s": values}
    peer = results["decord all"]["useful_per_s"]
    for result in results.values():
        result["x_peer"] = result["useful_per_s"] / peer

    clip = {"path": path, "bytes": args.video.stat().st_size, "frames": n_total, "size_hw": [height, width],
            "duration_s": float(timestamps[-1, 1] - timestamps[0, 0]), "keyframes": keyframes,
            "sampled": args.n_frames, "distinct_sampled": len(distinct) if distinct is not None else None}
    print(f"\nclip {args.video.name}: {n_total} frames of {width}x{height}, {clip['duration_s']:.1f} s, "
          f"{keyframes} keyframes, {clip['bytes'] / 1e6:.1f} MB; sampler: {args.n_frames} frames at the tiler's size "
          f"({args.tile_size} px, {args.max_tiles} tiles); median of {args.repeats} after {args.warmup} warm-up")
    print("| row            | frames | frame HxW  |  wall ms | delivered/s | useful/s | x decord all |")
    print("|----------------|--------|------------|----------|-------------|----------|--------------|")
    for name, r in results.items():
        hw = "x".join(map(str, r["frame_hw"]))
        print(f"| {name:<14} | {r['frames']:6d} | {hw:>10} | {r['wall_s'] * 1e3:8.1f} | {r['delivered_per_s']:11.1f} "
              f"| {r['useful_per_s']:8.1f} | {r['x_peer']:12.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"clip": clip, "decord": decord.__version__, "repeats": args.repeats,
                                         "warmup": args.warmup, "rows": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
