"""Webdataset shards → samples → batches: deterministic, resumable, and tolerant of a few bad samples.

Every modality uses this plumbing and supplies three small functions:
    decode(sample) -> value   sample = {"__key__", "__url__", ext: bytes}; raises `BadSample` for data it cannot use.
                              It runs on every sample, fast-forwarded ones included, so it decides what counts as bad.
    prepare(value) -> row     the expensive part (tokenizing, resizing); runs only for delivered samples and must not
                              fail, or batch boundaries would differ between a fresh and a resumed run.
    collate(rows) -> dict     tensors of one batch.

Stream of one rank: its shards (finite: each once; resampled: drawn with replacement, forever) → DataLoader worker w
of n reads its share (finite: shards w, w+n, …; resampled: its own seeded draws) → tar members → samples → decode →
seeded shuffle buffer → fast-forward drop → prepare → main process: the DataLoader's round robin over workers →
batches. Every random choice is seeded from (seed, rank, world_size, worker, n_workers), so a configuration always
yields the same batches.

Skipped and counted (see `SkipCounter`): a sample `decode` rejects, a sample with a duplicate member, and each damaged
region of a tar (a bad header up to the next good one, which loses the member it described; a damaged pax header
still counts though its member survives), or a cut-off end. Counted each time it is read: a resampled shard's damage
again at every draw, as a fraction of all samples read (those still in the shuffle buffer included).
"""

from __future__ import annotations

import atexit
import copy
import functools
import multiprocessing
import multiprocessing.synchronize
import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm_llama.data.skip_counter import SkipCounter
from mm_llama.data.tar_reader import Damage, read_shard
from mm_llama.errors import DataError, InputError
from mm_llama.values import is_int

__all__ = ["BadSample", "ShardBatches", "ShardSamples", "SkipCounter", "check_rank", "expand_shards", "is_int",
           "iterate_batches", "shard_config_problems"]


def shard_config_problems(config: object, minimums: dict[str, int],
                          paths: tuple[str, ...] = ("shards", "tokenizer")) -> list[str]:
    """What is wrong with the fields every shard-reading data config has (the `paths`: shards and, for text,
    tokenizer; resampled, max_skip_fraction) and with the integer fields named in `minimums` (name -> smallest
    allowed value)."""
    problems = []
    for name in paths:
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            problems.append(f"data.{name} must be a non-empty path, got {getattr(config, name)!r}")
    for name, low in minimums.items():
        if not is_int(getattr(config, name)) or getattr(config, name) < low:
            problems.append(f"data.{name} must be an integer >= {low}, got {getattr(config, name)!r}")
    if not isinstance(config.resampled, bool):
        problems.append(f"data.resampled must be true or false, got {config.resampled!r}")
    f = config.max_skip_fraction
    if not isinstance(f, int | float) or isinstance(f, bool) or not 0 <= f <= 1:
        problems.append(f"data.max_skip_fraction must be a number in [0, 1], got {f!r}")
    return problems


def check_rank(rank: object, world_size: object) -> None:
    """A data-parallel position every dataset checks the same way."""
    if not (is_int(rank) and is_int(world_size) and 0 <= rank < world_size):
        raise InputError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")


class BadSample(Exception):
    """Raised by a modality's `decode` for a sample it cannot use; the pipeline skips and counts it."""


def expand_shards(spec: str) -> list[str]:
    """The shard paths of a `shards:` setting.

    Args:
        spec: a brace pattern (`data/text-{000000..000003}.tar`), a directory (all its `*.tar`, sorted), a `.txt` file
            listing one shard per line (relative to the list's folder; blank and `#` lines ignored), or one shard.
            URLs (`pipe:`, `http://`, …) are passed to webdataset's `gopen` unchecked.
    Returns:
        the shards in order; `DataError` naming `spec` when there are none or a local shard is missing.
    """
    path = Path(spec)
    if "{" in spec:
        shards = list(braceexpand.braceexpand(spec))
    elif path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    elif path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the shard list {spec}: {e}") from None
        names = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
        shards = [n if not _is_local(n) or Path(n).is_absolute() else str(path.parent / n) for n in names]
    else:
        shards = [spec]
    if not shards:
        raise DataError(f"no shards in {spec!r}: expected a brace pattern like data/text-{{000000..000009}}.tar, a "
                        "directory holding *.tar files, or a .txt file listing one shard per line")
    missing = [s for s in shards if _is_local(s) and not Path(s).is_file()]
    if missing:
        raise DataError(f"shard {missing[0]} of {spec!r} does not exist ({len(missing)} of {len(shards)} missing)")
    return shards


def _is_local(shard: str) -> bool:
    return "://" not in shard and not shard.startswith("pipe:")


@dataclass
class _Item:
    """What a worker sends to the main process: a sample, a rotation marker, a trailing skip count or an error."""

    kind: str  # "sample" | "marker" | "tail" | "error"
    value: Any = None
    skipped: int = 0  # bad samples since the worker's previous delivered sample: the batch's "skipped"
    shard: str = ""
    reason: str = ""
    # (read, skipped) by the worker since its previous item, for the limit: also the samples it fast-forwarded over
    # and those now in its shuffle buffer, whose bad ones reach a batch's "skipped" only with a later sample.
    counts: tuple[int, int] = (0, 0)


def _share(total: int, worker: int, n_workers: int) -> int:
    """How many of the global indices 0..total-1 the round robin gives to `worker` (those ≡ worker mod n)."""
    return max(0, -(-(total - worker) // n_workers))


class ShardSamples(IterableDataset):
    """The prepared samples of one rank's shards; under a DataLoader each worker reads its own share.

    Args:
        shards: shard paths or URLs (see `expand_shards`).
        decode, prepare: see the module docstring.
        rank, world_size: this process among the data-parallel ranks (explicit, not read from torch.distributed).
        shuffle_buffer: samples in the shuffle buffer; 0 keeps file order.
        seed: seeds shard draws, shard order and the shuffle buffer.
        resampled: draw shards with replacement, forever; else each of the rank's shards once.
        max_skip_fraction: see `SkipCounter`.
    """

    def __init__(self, shards: list[str], *, decode: Callable[[dict], Any], prepare: Callable[[Any], Any],
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0, seed: int = 0, resampled: bool = True,
                 max_skip_fraction: float = 0.01):
        if not resampled and len(shards) < world_size:
            raise DataError(f"{len(shards)} shard(s) cannot feed {world_size} ranks without resampling: every rank "
                            "reads different shards, so it needs at least one (set resampled: true or add shards)")
        self.shards, self.decode, self.prepare = list(shards), decode, prepare
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.resampled, self.max_skip_fraction = shuffle_buffer, resampled, max_skip_fraction
        self.drop = 0  # the first `drop` samples the round robin would deliver are skipped, before `prepare`

    def _urls(self, worker: int, n_workers: int, stream_id: str) -> Iterator[str]:
        if not self.resampled:
            # Same seeded order on every rank, then disjoint slices: rank r reads r, r+W, …; its worker w every n-th.
            order = list(self.shards)
            if self.shuffle_buffer > 0:
                random.Random(f"order/{self.seed}").shuffle(order)
            yield from order[self.rank :: self.world_size][worker::n_workers]
            return
        # Disjoint pools per rank when there are enough shards; else ranks differ only through their seeds.
        pool = self.shards[self.rank :: self.world_size] if len(self.shards) >= self.world_size else self.shards
        rng = random.Random(f"shards/{stream_id}")
        while True:
            yield rng.choice(pool)

    def _decoded(self, urls: Iterator[str], counter: SkipCounter) -> Iterator[Any]:
        empty_run = 0  # an endless stream over shards without any sample would otherwise never yield nor end
        for url in urls:
            found = False
            for sample in read_shard(url):
                found = True
                if isinstance(sample, Damage):
                    counter.bad(url, sample.reason)
                    continue
                try:
                    value = self.decode(sample)
                except BadSample as e:
                    counter.bad(url, str(e))
                    continue
                counter.good()
                yield value
            empty_run = 0 if found else empty_run + 1
            if empty_run > max(10, 2 * len(self.shards)):
                raise DataError(f"{empty_run} shards in a row held no sample (latest {url}); are they empty?")

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter(self.max_skip_fraction)
        try:
            yield from self._items(worker, n_workers, counter)
        except DataError as e:
            # Raised in a worker, the error would reach the main process rewrapped around a traceback; as an item it
            # arrives intact and the main process raises it.
            yield _Item("error", reason=str(e))

    def _items(self, worker: int, n_workers: int, counter: SkipCounter) -> Iterator[_Item]:
        stream_id = f"{self.seed}/{self.rank}/{self.world_size}/{worker}/{n_workers}"
        # The main process takes item i from worker i mod n. After dropping its share of the first `drop` samples,
        # each worker below drop mod n sends one marker first, so the round robin resumes at the right worker.
        if n_workers > 1 and worker < self.drop % n_workers:
            yield _Item("marker")
        to_drop = _share(self.drop, worker, n_workers)
        # The round robin lets every other worker deliver at most one item more than this one before our next; each
        # has read up to a shuffle buffer more than it delivered.
        counter.elsewhere = (n_workers - 1) * (2 + self.shuffle_buffer)
        values = self._decoded(self._urls(worker, n_workers, stream_id), counter)
        in_worker = get_worker_info() is not None
        if self.shuffle_buffer > 0:
            rng = random.Random(f"shuffle/{stream_id}")
            values = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(values)
        emitted = 0
        for value in values:
            skipped, shard, reason = counter.take()
            emitted += 1
            counter.elsewhere = (n_workers - 1) * (emitted + 2 + self.shuffle_buffer)
            if to_drop:  # fast-forward: decoded (to count bad samples) but never prepared; its counts go with our next
                to_drop -= 1
                continue
            prepared = self.prepare(value)
            if in_worker:
                prepared = _map_tensors(prepared, _pack)
            yield _Item("sample", prepared, skipped, shard, reason, counts=counter.report())
        skipped, shard, reason = counter.take()
        counts = counter.report()
        if counts != (0, 0):
            yield _Item("tail", None, skipped, shard, reason, counts=counts)


class _Packed:
    """A tensor on its way from a DataLoader worker as a numpy array.

    A worker sends each sample on its own; a tensor travels as a shared-memory segment plus a file descriptor, which
    costs more than decoding the sample, and the main process receives them one by one: with 84-px image rows on a
    16-core host, 8 workers delivered 1,032 samples/s as tensors and 2,577 packed (issue 10's note has the measurement,
    by worker count). A numpy array is pickled in-band; the main process unpacks it without a copy.
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _pack(value: Any) -> Any:
    return _Packed(value.numpy()) if isinstance(value, torch.Tensor) else value


def _unpack(value: Any) -> Any:
    return torch.from_numpy(value.array) if isinstance(value, _Packed) else value


def _map_tensors(value: Any, convert: Callable[[Any], Any]) -> Any:
    """`value` with `convert` applied to each leaf inside its (named) tuples, lists and dicts."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple rows
        return type(value)(*(_map_tensors(v, convert) for v in value))
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (int, float, str)):  # token ids, flags: rows of scalars hold no tensor
            return value
        return type(value)(_map_tensors(v, convert) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, convert) for k, v in value.items()}
    return convert(value)


def _items(samples: ShardSamples, num_workers: int) -> Iterator[_Item]:
    if num_workers == 0:
        yield from samples
        return
    # Our own generator: the DataLoader draws its base seed from it instead of from torch's global RNG, whose state
    # training saves and restores. Workers use only their own seeded RNGs.
    for item in DataLoader(samples, batch_size=None, num_workers=num_workers,
                           worker_init_fn=functools.partial(_worker_signals, _main_exiting()),
                           generator=torch.Generator().manual_seed(samples.seed)):
        if item.kind == "sample":
            item.value = _map_tensors(item.value, _unpack)
        yield item


@functools.cache
def _main_exiting() -> multiprocessing.synchronize.Event:
    """Set when this (main) process exits; its DataLoader workers inherit it."""
    event = multiprocessing.Event()
    atexit.register(event.set)  # runs before multiprocessing's own exit hook, which terminates daemonic workers
    return event


def _worker_signals(main_exiting: multiprocessing.synchronize.Event, worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGINT: a scheduler signals the whole process group, and the main
    process must checkpoint before its workers go (see `mm_llama.train.stop`). Only a SIGTERM sent while the main
    process exits (multiprocessing terminating its daemonic children) ends the worker; without that, a worker whose
    iterator was never shut down would make the exit wait forever. It then exits with status 0: it was asked to go,
    and torch's SIGCHLD handler in the main process reports any other status as "DataLoader worker exited
    unexpectedly", a traceback at the end of every script that leaves an iterator open."""
    def on_term(signum, frame) -> None:
        if main_exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def iterate_batches(samples: ShardSamples, *, batch_size: int, collate: Callable[[list], dict], num_workers: int = 0,
                    start: int = 0) -> Iterator[dict]:
    """Batches of `samples`, read by `num_workers` DataLoader workers (0: in this process), from batch `start` on.

    Args:
        samples: the rank's sample stream.
        batch_size: rows per batch; the last batch of a finite stream may be smaller.
        collate: rows → dict of tensors.
        num_workers: DataLoader workers.
        start: index of the first batch; what a fresh run yields from its `start`-th batch on, exactly.
    Returns:
        an iterator of `collate(rows)` plus "skipped" (bad samples since the previous batch) and "samples" (rows).
        `DataError` (raised in this process, message intact) when too many samples are bad.
    """
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise InputError(f"start must be a batch index >= 0, got {start!r}")
    # Workers can skip their round-robin share cheaply when no worker runs dry before the start: always true for
    # endless streams and for a single stream. A finite stream over several workers is fast-forwarded here instead.
    samples = copy.copy(samples)
    in_workers = samples.resampled or num_workers <= 1
    samples.drop, to_drop = (start * batch_size, 0) if in_workers else (0, start * batch_size)
    return _batches(samples, batch_size, collate, num_workers, to_drop)


def _batches(samples: ShardSamples, batch_size: int, collate: Callable[[list], dict], num_workers: int,
             to_drop: int) -> Iterator[dict]:
    # All workers together, as they report; the workers warn themselves.
    counter = SkipCounter(samples.max_skip_fraction, streams=max(num_workers, 1), warn_every=None)
    rows, skipped, held = [], 0, None
    for item in _items(samples, num_workers):
        if item.kind == "error":
            raise DataError(item.reason)
        counter.add(*item.counts, item.shard, item.reason)
        skipped += item.skipped
        if item.kind != "sample":
            continue
        if to_drop:
            to_drop, skipped = to_drop - 1, 0
            continue
        # A full batch is held until the next sample arrives, so skips at the very end of a finite stream still
        # reach the last batch.
        if held is not None:
            yield held
            held = None
        rows.append(item.value)
        if len(rows) == batch_size:
            held, rows, skipped = {**collate(rows), "skipped": skipped, "samples": len(rows)}, [], 0
    if rows:
        if held is not None:
            yield held
        yield {**collate(rows), "skipped": skipped, "samples": len(rows)}
    elif held is not None:
        held["skipped"] += skipped
        yield held


class ShardBatches:
    """One rank's batches of a data section (`shards`, `batch_size`, `shuffle_buffer`, `seed`, `resampled`,
    `num_workers`, `max_skip_fraction`), with a modality's decode / prepare / collate: what every dataset class
    (text, image-text, image-caption) builds on.

    Args:
        config: the data section.
        rank, world_size: this process among the data-parallel ranks; each rank reads different shards.
    """

    def __init__(self, config: Any, *, rank: int, world_size: int, decode: Callable[[dict], Any],
                 prepare: Callable[[Any], Any], collate: Callable[[list], dict]):
        check_rank(rank, world_size)
        self.config, self.collate = config, collate
        self.shards = expand_shards(config.shards)
        self.samples = ShardSamples(self.shards, decode=decode, prepare=prepare, rank=rank, world_size=world_size,
                                    shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                                    resampled=config.resampled, max_skip_fraction=config.max_skip_fraction)

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from batch `start` on: exactly what a fresh call yields from its `start`-th batch."""
        return iterate_batches(self.samples, batch_size=self.config.batch_size, collate=self.collate,
                               num_workers=self.config.num_workers, start=start)
