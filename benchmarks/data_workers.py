"""Image-text batches per second from DataLoader workers: samples sent as numpy arrays (what the pipeline does) against
the same samples sent as tensors through shared memory (torch's default, the peer), side by side in one run.

    python benchmarks/data_workers.py [--workers 1 4 8] [--n 6000] [--batches 40]

Writes a shapes-world image set (84 px, the demo's) to a temporary folder, then reads `--batches` batches of 64 after
three warm-up batches for each worker count and transport. On a 16-core H200 host (issue 10): 1 worker 533 -> 913
samples/s, 4 workers 1,013 -> 2,079, 8 workers 1,032 -> 2,577 (tensors -> numpy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mm_llama.data.pipeline as pipeline
from mm_llama.data.image import ImageDataConfig, ImageTextBatches
from mm_llama.data.synth_image import synth_image


def samples_per_second(shards: Path, workers: int, batches: int) -> float:
    config = ImageDataConfig(shards=str(shards), tokenizer=str(shards / "tokenizer.model"), tile_size=84, max_tiles=1,
                             seq_len=256, batch_size=64, shuffle_buffer=2000, seed=0, resampled=True,
                             num_workers=workers, task="mixed")
    stream = ImageTextBatches(config).batches()
    for _ in range(3):
        next(stream)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(stream)["samples"]
    rate = n / (time.perf_counter() - start)
    stream.close()  # ends the workers before the next configuration starts its own
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--n", type=int, default=6000, help="images to generate")
    parser.add_argument("--batches", type=int, default=40, help="timed batches of 64 per configuration")
    args = parser.parse_args()
    pack = pipeline._pack
    with tempfile.TemporaryDirectory() as tmp:
        synth_image(Path(tmp), args.n, seed=5)
        print(f"{'workers':>7}  {'tensors':>9}  {'numpy':>9}  ratio   (samples/s)")
        for workers in args.workers:
            pipeline._pack = lambda value: value  # the peer: tensors as they are, through shared memory
            tensors = samples_per_second(Path(tmp), workers, args.batches)
            pipeline._pack = pack
            packed = samples_per_second(Path(tmp), workers, args.batches)
            print(f"{workers:>7}  {tensors:>9,.0f}  {packed:>9,.0f}  {packed / tensors:.2f}x")


if __name__ == "__main__":
    main()
