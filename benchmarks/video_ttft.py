"""Llama 3.2 11B-Vision layout with a video adapter of the paper's proportions (`VideoAdapterConfig`'s defaults: 64
frames, groups of 32 -> 2 effective frames of one frame's tokens each, a video block before every 4th image block),
random weights, bf16, batch 1: the time to the first token of one question about one 64-frame clip, split into its
parts, and end to end through the real path (`Videos.prepare` + `Generator.stream_batch(media=Media(videos=...))`).

    python benchmarks/video_ttft.py --make .exp/s7/media/ttft_10s_360p.mp4     # where ffmpeg is: write the clip
    python benchmarks/video_ttft.py --video .exp/s7/media/ttft_10s_360p.mp4    # one GPU (no ffmpeg needed there)
    python benchmarks/video_ttft.py --device cpu                               # debug layout, clip made on the fly

Parts, in the order the real path runs them, each ended by a synchronisation (median of --repeats after --warmup):
    decode      read_video: 64 frames sampled uniformly and decoded by decord (worker process) at the tiler's size
    tile        ImageTransform of every frame + collate_videos (CPU, fp32 pixels)
    upload      Videos.to(device): the fp32 pixels to the GPU, as Media.to does
    ViT         the frames through the image encoder (as 64 images of 4 tile slots each) and the projection
    aggregator  the temporal aggregator (perceiver resampler): 2 groups of 32 frames -> 2 effective frames
    prefill     the video blocks' masks and K/V, the trunk's prefill (video blocks included) and the first sample
The parts call what `encode_videos` / `MMLlama.prepare` / `Generator.stream_steps` call, in the same order and on the
same shapes (the split's effective frames are checked against `encode_videos`). "real path" times the whole request
from the file's path to the first streamed token; it should be close to the sum of the parts. With --modes compiled
(a GPU), `Generator(compile=True)` is used: compiled ViT and prefill (the aggregator and the K/V stay eager, as there).

Without --video a clip is made on the fly with `encode_mp4` (ffmpeg): --seconds of --size at --fps (see `make_clip`),
x264's default GOP (a keyframe every 250 frames at most).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mllama_layout import build_random, sync

from adapters.video import VideoAdapterConfig, encode_videos, video_inputs
from encoders.image_transform import ImageTransform, ImageTransformConfig
from encoders.video import Videos, collate_videos, read_video
from mm_llama.errors import InputError
from mm_llama.generate import Generator, Sampling, sample
from mm_llama.media import Media, MediaState
from mm_llama.transfer import tensor_to_device, to_device

PARTS = {"decode": "decode (read_video, decord worker)", "tile": "tile (ImageTransform + collate, CPU)",
         "upload": "upload (fp32 pixels to the device)", "vit": "ViT + projection", "aggregator": "aggregator",
         "prefill": "prefill (video K/V + trunk + 1st token)"}


def make_clip(path: Path, seconds: float, fps: int, width: int, height: int) -> Path:
    """Write an H.264 mp4 (encode_mp4, CRF 15) of `seconds` at `fps`, width x height: moving gradients over a panning
    random texture, and a moving square. Gradients alone would be almost free to code (0.3 MB for 10 s of 360p); the
    texture gives a bit rate (~3.7 Mbit/s at 360p) and so a decoding cost like that of a detailed real clip."""
    from mm_llama.data.world_video import encode_mp4

    y, x = np.mgrid[0:height, 0:width]
    texture = np.random.default_rng(0).integers(0, 48, (height + 64, width + 64), dtype=np.uint8)
    frames = np.empty((round(seconds * fps), height, width, 3), dtype=np.uint8)  # (n, H, W, 3)
    side = height // 4
    for t in range(len(frames)):
        detail = texture[t % 64:t % 64 + height, 2 * t % 64:2 * t % 64 + width]  # (H, W), pans down and right
        frames[t, ..., 0] = (x + 4 * t) % 208 + detail
        frames[t, ..., 1] = (y + 2 * t) % 208 + detail
        frames[t, ..., 2] = ((x + y) // 2 + 3 * t) % 208 + detail
        left, top = (7 * t) % (width - side), (3 * t) % (height - side)
        frames[t, top:top + side, left:left + side] = (255, 255, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--video", type=Path, help="the clip to ask about (default: one made on the fly, needs ffmpeg)")
    parser.add_argument("--make", type=Path, help="write the clip to this path with encode_mp4 and exit")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a made clip")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of a made clip")
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of a made clip")
    parser.add_argument("--modes", default=None, help="comma-separated: eager, compiled (default: both on a GPU, "
                        "eager on the CPU)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens of the real path's request (the "
                        "first decode step is queued before the first token is read, as in any request)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1 (the first run starts the decoder and compiles)")
    gpu = torch.device(args.device).type == "cuda"
    args.modes = (args.modes or ("eager,compiled" if gpu else "eager")).split(",")
    if bad := [m for m in args.modes if m not in ("eager", "compiled") or (m == "compiled" and not gpu)]:
        parser.error(f"--modes {bad}: the modes are eager and compiled (compiled on a GPU only)")
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.video is not None and not args.video.is_file():
        parser.error(f"--video {args.video}: no such file")
    if args.make is not None:
        make_clip(args.make, args.seconds, args.fps, width, height)
        print(f"wrote {args.make} ({args.make.stat().st_size / 1e6:.2f} MB)")
        return
    with tempfile.TemporaryDirectory(prefix="video-ttft-") as tmp:
        video = args.video
        if video is None:
            try:
                video = make_clip(Path(tmp) / "clip.mp4", args.seconds, args.fps, width, height)
            except InputError as e:
                parser.error(f"no clip given and none can be made here ({e}); make one where ffmpeg is (--make PATH) "
                             "and pass it with --video PATH")
        run(args, video)


def run(args: argparse.Namespace, video: Path) -> None:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    modes = args.modes
    print(f"building the {'11B-Vision' if gpu else 'debug'} layout with a video adapter ...", flush=True)
    model = build_random(device, gpu, video=VideoAdapterConfig()).to(dtype).eval().requires_grad_(False)
    vc, cfg = model.config.vision, model.config.video_adapter
    n_frames, n_effective = cfg.n_frames, cfg.n_moments
    # One question about one clip: a 24-token chat-like prompt with <|video|> where the user turn starts.
    torch.manual_seed(1)
    prompt = torch.randint(10, model.trunk.config.vocab_size, (24,)).tolist()
    prompt[5] = model.video_id
    transform = ImageTransform(ImageTransformConfig(tile_size=vc.tile_size, max_tiles=vc.max_tiles))
    sampling = Sampling(max_new_tokens=args.new_tokens)

    clip = read_video(video, n_frames=n_frames, tile_size=vc.tile_size, max_tiles=vc.max_tiles)
    first = transform(clip.frames[0])
    info = {"path": str(video), "bytes": video.stat().st_size, "frames_in_file": clip.n_total,
            "fps": round(clip.fps, 3), "duration_s": round(clip.duration_s, 3),
            "decoded_size_hw": list(clip.frames.shape[1:3]), "canvas_tiles": list(first.aspect_ratio),
            "sampled_frames": n_frames, "effective_frames": n_effective,
            "tile_slots_through_vit": n_frames * vc.max_tiles, "real_tiles": n_frames * first.n_tiles,
            "latents_per_effective_frame": model.video_adapter.aggregator.n_latents,
            "video_blocks_before_layers": list(model.video_adapter.schedule)}
    n_params = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    print(f"clip: {json.dumps(info)}", flush=True)
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in n_params.items()), flush=True)

    def pieces(generator: Generator) -> tuple[dict[str, float], Videos, torch.Tensor]:
        """One request, part by part: ms per part, and the tiled clip and its effective frames (for the check)."""
        sync(device)  # the previous request's queued decode step is not this one's
        times, t = {}, time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            sync(device)
            now = time.perf_counter()
            times[name], t = (now - t) * 1e3, now

        clip = read_video(video, n_frames=n_frames, tile_size=vc.tile_size, max_tiles=vc.max_tiles)
        lap("decode")
        videos = collate_videos([[[transform(frame) for frame in clip.frames]]])
        lap("tile")
        videos = videos.to(device)
        lap("upload")
        with torch.inference_mode():
            # encode_videos' steps for one clip: its F frames as F images of one sample, then the aggregator.
            pixels = videos.pixel_values[:, 0].to(model.vision_projection.weight.dtype)  # (1, F, N, 3, T, T)
            ratio_ids = videos.aspect_ratio_ids[:, :1].repeat(1, n_frames)  # (1, F)
            tile_mask = to_device(videos.tile_mask[:, :1].repeat(1, n_frames, 1), device)  # (1, F, N)
            tokens = model.vision_projection(generator._encoders.get("vision", model.vision)(
                pixels, ratio_ids, tile_mask)).flatten(2, 3)  # (1, F, N·L, D)
            lap("vit")
            effective = model.video_adapter.aggregator(tokens).flatten(1, 2)  # (1, E·Q, D)
            lap("aggregator")
            ids = tensor_to_device([prompt], device)
            positions = torch.arange(len(prompt), device=device)[None]  # (1, T)
            first_slot = torch.zeros(1, dtype=torch.long, device=device)
            cross = video_inputs([prompt], videos, effective, n_effective, video_id=model.video_id,
                                 adapter=model.video_adapter)
            cache = generator._cache(1, len(prompt) + sampling.max_new_tokens)
            out = generator._prefill(model, ids, positions, first_slot, cache, MediaState({"video_adapter": cross}),
                                     ())
            sample(out.logits[:, -1], sampling).tolist()
            lap("prefill")
        return times, videos, effective

    def real_path(generator: Generator) -> float:
        """One request from the file's path to the first streamed token (ms)."""
        sync(device)
        start = time.perf_counter()
        videos = Videos.prepare([[video]], tile_size=vc.tile_size, max_tiles=vc.max_tiles, n_frames=n_frames)
        stream = generator.stream_batch([prompt], sampling, media=Media(videos=videos))
        next(stream)
        ttft = (time.perf_counter() - start) * 1e3
        stream.close()
        return ttft

    results = {}
    for mode in modes:
        print(f"[{mode}] warm-up ({args.warmup}) ...", flush=True)
        generator = Generator(model, compile=mode == "compiled")
        for _ in range(args.warmup):
            _, videos, effective = pieces(generator)
            real_path(generator)
        with torch.inference_mode():
            reference = encode_videos(videos, generator._encoders.get("vision", model.vision),
                                      model.vision_projection, model.video_adapter.aggregator)
        diff = (reference.float() - effective.float()).abs().max().item()
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        runs = []
        for i in range(args.repeats):
            runs.append(pieces(generator)[0])
            runs[-1]["real"] = real_path(generator)
            print(f"[{mode}] run {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items()) + " ms",
                  flush=True)
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[mode] = {"median_ms": median, "sum_of_parts_ms": sum(median[k] for k in PARTS),
                         "split_vs_encode_videos_max_abs_diff": diff, "runs_ms": runs}
        if gpu:
            results[mode]["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        print(f"[{mode}] split's effective frames vs encode_videos: max |diff| {diff:.3g}", flush=True)

    print(f"\n{'H200' if gpu else 'CPU'} ({torch.cuda.get_device_name(device) if gpu else 'debug layout'}), "
          f"{dtype}, torch {torch.__version__}; median of {args.repeats} after {args.warmup} warm-up")
    print(f"clip {video.name}: {clip.n_total} frames, {clip.duration_s:.1f} s at {clip.fps:.1f} fps, decoded at "
          f"{clip.frames.shape[2]}x{clip.frames.shape[1]}, {first.n_tiles} of {vc.max_tiles} tiles per frame")
    print("| part                                     | " + " | ".join(f"{m:>11} ms" for m in modes) + " |")
    print("|------------------------------------------|" + "|".join("-" * 16 for _ in modes) + "|")
    rows = [(label, [results[m]["median_ms"][k] for m in modes]) for k, label in PARTS.items()]
    rows.append(("sum of parts", [results[m]["sum_of_parts_ms"] for m in modes]))
    rows.append(("real path (Videos.prepare + Generator)", [results[m]["median_ms"]["real"] for m in modes]))
    for label, values in rows:
        print(f"| {label:<40} | " + " | ".join(f"{v:14.1f}" for v in values) + " |")
    if gpu:
        print("peak memory: " + ", ".join(f"{m} {results[m]['peak_memory_gb']:.1f} GB" for m in modes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(device) if gpu else "cpu",
                                         "dtype": str(dtype), "torch": torch.__version__, "clip": info,
                                         "parameters": n_params, "repeats": args.repeats, "warmup": args.warmup,
                                         "modes": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
