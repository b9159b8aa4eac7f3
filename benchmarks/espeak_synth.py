"""In-process espeak-ng (`mm_llama.data.espeak.Espeak`, a fresh library per utterance) against one `espeak-ng -w`
process per sentence, side by side on the same shapes-world sentences and voices (interleaved, medians).

    python benchmarks/espeak_synth.py --n 200
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from mm_llama.data.espeak import Espeak, Voice

COLOURS, SHAPES = ("red", "green", "blue", "yellow", "purple"), ("circle", "square", "triangle", "star", "shape")
VOICES = ("en-us", "en", "en-us+f3", "en-gb-scotland")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="sentences")
    args = parser.parse_args()
    engine = Espeak()
    ours, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            text = f"The {COLOURS[i % 5]} {SHAPES[i // 5 % 5]} moves to the {('left', 'right')[i % 2]}."
            voice = VOICES[i % len(VOICES)]
            start = time.perf_counter()
            engine.synth(text, Voice(voice))
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(Path(tmp) / "s.wav"), text], check=True,
                           capture_output=True, timeout=30)
            peer.append(time.perf_counter() - start)
    a, b = statistics.median(ours), statistics.median(peer)
    print(f"{args.n} sentences, median per sentence: in-process {a * 1e3:.2f} ms, one espeak-ng process each "
          f"{b * 1e3:.2f} ms, speed-up x{b / a:.2f}")


if __name__ == "__main__":
    main()
