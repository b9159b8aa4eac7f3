"""Latency of the embedded demo model on the CPU, as a demo user meets it (issue 10's budget on 2 cores: an image
question's first token within 300 ms, the whole short answer within 1 s).

    python benchmarks/demo_latency.py [--threads 2] [--n 40] [--dtype fp32|bf16] [--checkpoint DIR] [--spoken]

Held-out shapes-world image questions through `Assistant.ask_stream`, greedy, after three warm-up questions; the
first token's time includes everything the page waits for (image preprocessing, the ViT, prefill, the first decode
step). With --spoken the questions are spoken in the held-out voice and sent with no text (a 16 kHz waveform in
memory): the first token's time is then from the end of the question, and includes the log-mel features and the
speech encoder and adapter. Prints the median and 90th percentile of each, and the answers' lengths.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from encoders.audio import SAMPLE_RATE
from mm_llama.api import Assistant
from mm_llama.data.synth_speech import spoken_question
from mm_llama.data.world import random_scene
from mm_llama.data.world_draw import draw_scene
from mm_llama.data.world_language import QUESTION_TYPES, image_question
from mm_llama.errors import InputError


def questions(n: int, seed: int = 0, spoken: bool = False) -> list[dict]:
    """`n` held-out questions, each as `Assistant.ask_stream`'s keyword arguments, the types in turn."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        qtype = QUESTION_TYPES[len(out) % len(QUESTION_TYPES)]
        try:
            if spoken:
                asked = spoken_question(rng, "heldout", qtype)
                out.append({"audio": (asked.wave.numpy(), SAMPLE_RATE), "image": asked.image})
            else:
                scene = random_scene(rng, "heldout")
                qa = image_question(scene, rng, "heldout", qtype)
                out.append({"question": qa.question, "image": draw_scene(scene, 84, rng)})
        except InputError:  # no question of this type about the scene: draw another
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--checkpoint", default="demo", help="the shipped model (default) or another to compare")
    parser.add_argument("--spoken", action="store_true", help="speak the questions (held-out voice), no text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    assistant = Assistant.from_pretrained(args.checkpoint, dtype=dtype)
    print(f"load: {time.perf_counter() - start:.2f} s ({args.threads} threads, {args.dtype})")
    items = questions(args.n + 3, spoken=args.spoken)
    first, whole, lengths = [], [], []
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        pieces = []
        for piece in assistant.ask_stream(**item, max_new_tokens=96):
            if not pieces:
                t_first = time.perf_counter() - t0
            pieces.append(piece)
        if i >= 3:  # warm-up: first calls allocate caches and pick kernels
            first.append(t_first)
            whole.append(time.perf_counter() - t0)
            lengths.append(len(assistant.tokenizer.encode("".join(pieces), bos=False, eos=False)))

    def q90(xs: list[float]) -> float:
        return sorted(xs)[int(0.9 * (len(xs) - 1))]

    print(f"first token: median {1000 * statistics.median(first):.0f} ms, p90 {1000 * q90(first):.0f} ms")
    print(f"whole answer: median {1000 * statistics.median(whole):.0f} ms, p90 {1000 * q90(whole):.0f} ms, "
          f"max {1000 * max(whole):.0f} ms")
    print(f"answer length: median {statistics.median(lengths):.0f} tokens, max {max(lengths)}")


if __name__ == "__main__":
    main()
