"""Generated samples made in fixed chunks by several processes, delivered in order: `mm-llama data synth` on all cores.

Chunk k (samples k*CHUNK .. k*CHUNK+CHUNK-1) draws from its own `random.Random(f"{seed}/{k}")`, so the samples depend
on the seed only, never on the number of processes: one process and sixteen write byte-identical shards. Drawing a
scene and its PNG is what costs (about 1,000 samples/s per core); the tar writer stays in the calling process.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Callable, Iterator

from mm_llama.errors import InputError

__all__ = ["CHUNK", "default_workers", "parallel_samples"]

CHUNK = 500  # samples per chunk: large enough that a chunk's hand-off is cheap, small enough to spread 60k over 16
Sample = dict[str, bytes]


def default_workers() -> int:
    """Processes for synth by default: the cores this process may use, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


class _Chunk:
    """(index, count) -> the chunk's samples; picklable, so pool workers can run it."""

    def __init__(self, make: Callable[[random.Random], Sample], seed: int):
        self.make, self.seed = make, seed

    def __call__(self, spec: tuple[int, int]) -> list[Sample]:
        index, count = spec
        rng = random.Random(f"{self.seed}/{index}")
        return [self.make(rng) for _ in range(count)]


def parallel_samples(make: Callable[[random.Random], Sample], n: int, *, seed: int,
                     workers: int | None = None) -> Iterator[Sample]:
    """`n` samples, `make(rng)` each, in chunks of CHUNK with a seeded rng per chunk, made by `workers` processes.

    Args:
        make: one sample from an rng; a module-level function or a `functools.partial` of one (it is pickled).
        n: samples in all.
        seed: the data set's seed.
        workers: processes (None: `default_workers()`; 1 makes them in this process).
    Returns:
        an iterator of the samples in order.
    """
    if workers is None:
        workers = default_workers()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    specs = [(k, min(CHUNK, n - k * CHUNK)) for k in range(-(-n // CHUNK))]
    return _in_order(_Chunk(make, seed), specs, workers)  # checked above, before anything is drawn


def _one_thread() -> None:
    """A worker's torch runs on one thread: the workers already fill the cores, and torch's OpenMP pool, inherited
    from a parent that used it, is not fork-safe (speech samples resample with torch: on 16 cores, workers with
    the inherited pool made under 60 samples/s in all, against about 50/s each alone)."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _in_order(chunk: _Chunk, specs: list[tuple[int, int]], workers: int) -> Iterator[Sample]:
    if workers == 1 or len(specs) == 1:
        for spec in specs:
            yield from chunk(spec)
        return
    # fork: the workers inherit the imported modules (spawn would import torch again in each, seconds apiece).
    with multiprocessing.get_context("fork").Pool(min(workers, len(specs)), initializer=_one_thread) as pool:
        for samples in pool.imap(chunk, specs):
            yield from samples
