"""Llama 3.2 11B-Vision layout, one 4-tile 560-px image + a 24-token prompt, 128 new tokens, batch 1, bf16: our
time to first token and decode tokens/s against transformers' MllamaForConditionalGeneration on the same random
weights, in the same process.

    python benchmarks/vision_decode.py                 # one GPU
    python benchmarks/vision_decode.py --device cpu    # tiny layout, same table

TTFT covers everything from pixels to the first token: the ViT, the projection, the image K/V of the 8 cross blocks,
the prefill and the first sample. Decode tokens/s excludes the first token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mllama_layout import build_random, sync, to_transformers

from adapters.image import encode_images, image_inputs
from encoders.image_transform import Images
from mm_llama.generate import Generator, Sampling
from mm_llama.media import Media, MediaState


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    skip = set(filter(None, args.skip.split(",")))
    model = build_random(device, gpu).to(dtype).eval().requires_grad_(False)
    v = model.vision.config
    # One 4-tile image (2 x 2 layout, aspect-ratio id 6) and a 24-token chat-like prompt with the image inside.
    pixels = torch.randn(1, 1, v.max_tiles, 3, v.tile_size, v.tile_size, device=device, dtype=dtype)
    ratio = torch.tensor([[6]], device=device)
    images = Images(pixels, ratio, torch.ones(1, 1, v.max_tiles, dtype=torch.bool), [1])
    prompt = torch.randint(10, model.trunk.config.vocab_size, (24,)).tolist()
    prompt[5] = model.image_id
    n = args.new_tokens
    rows = []

    def measure(label, fn):
        if label in skip:
            return
        try:
            fn()
            results = [fn() for _ in range(args.repeats)]
        except Exception as e:  # a row that fails is reported, the others still run
            print(f"  {label}: failed: {type(e).__name__}: {e}", flush=True)
            return
        ttft, rate = statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)
        rows.append((label, ttft, rate))
        print(f"  {label}: ttft {ttft * 1e3:.1f} ms, decode {rate:.1f} tok/s", flush=True)

    def breakdown(generator):
        """Where the time to first token goes (median of 5, each part synchronised)."""
        def timed(fn):
            times = []
            for _ in range(5):
                sync(device)
                start = time.perf_counter()
                out = fn()
                sync(device)
                times.append(time.perf_counter() - start)
            return out, statistics.median(times) * 1e3

        from mm_llama.generate import KVCache

        tokens = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            projected, t_vision = timed(lambda: encode_images(images, generator._encoders["vision"],
                                                              model.vision_projection, hf_padding_images=False))
            cross, t_cross = timed(lambda: image_inputs([prompt], images, projected, image_id=model.image_id,
                                                        adapter=model.image_adapter))
            cache = KVCache.for_model(model.trunk, 1, 256)
            slots = torch.arange(len(prompt), device=device)
            first = torch.zeros(1, dtype=torch.long, device=device)
            state = MediaState({"image_adapter": cross})
            _, t_prefill = timed(lambda: generator._prefill(model, tokens, slots[None], first, cache, state, ()))
        print(f"  TTFT parts: image encoder + projection {t_vision:.1f} ms, masks + image K/V {t_cross:.1f} ms, "
              f"prefill {t_prefill:.1f} ms", flush=True)

    def ours(generator):
        def run():
            sync(device)
            start = time.perf_counter()
            first, count = None, 0
            for _ in generator.stream_batch([prompt], Sampling(max_new_tokens=n), media=Media(images=images)):
                count += 1
                first = first or time.perf_counter()
            end = time.perf_counter()
            assert count == n
            return first - start, (n - 1) / (end - first)
        return run

    measure("mm-llama eager", ours(Generator(model)))
    if gpu:
        compiled = Generator(model, compile=True)
        measure("mm-llama compiled", ours(compiled))
        breakdown(compiled)
    hf = to_transformers(model, device, lambda name: dtype).eval()
    ids = torch.tensor([prompt], device=device)
    cross = torch.zeros(1, len(prompt), 1, v.max_tiles, dtype=torch.long, device=device)
    cross[0, 5:] = 1

    def peer(k: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                              aspect_ratio_ids=ratio, aspect_ratio_mask=torch.ones(1, 1, v.max_tiles, device=device,
                                                                                   dtype=torch.long),
                              cross_attention_mask=cross, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                              pad_token_id=0)
        sync(device)
        assert out.shape[1] == len(prompt) + k
        return time.perf_counter() - start

    def hf_run():
        ttft = peer(1)
        return ttft, (n - 1) / (peer(n) - ttft)

    measure("hf dynamic", hf_run)
    peer_rate = dict((label, rate) for label, _, rate in rows).get("hf dynamic")
    weight_bytes = sum({id(p): p.numel() * p.element_size() for p in model.parameters()}.values())
    print(f"\n{weight_bytes / 1e9:.2f} GB of weights; {'H200' if gpu else 'CPU'}; {torch.__version__}")
    print("| implementation    |  TTFT ms | decode tok/s | x hf dynamic |")
    print("|-------------------|----------|--------------|--------------|")
    for label, ttft, rate in rows:
        ratio = rate / peer_rate if peer_rate else float("nan")
        print(f"| {label:<17} | {ttft * 1e3:8.1f} | {rate:12.1f} | {ratio:12.2f} |")


if __name__ == "__main__":
    main()
