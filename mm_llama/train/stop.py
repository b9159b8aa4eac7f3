"""Stopping a run on SIGTERM / SIGINT without losing it.

The handler only sets a flag: the loop finishes the step, all ranks agree, a checkpoint is written, and the process
exits with 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C), so a script that chains stages does not take
an interrupted run for a finished one.

Schedulers (SLURM, Kubernetes, GNU `timeout`, `kill -- -PGID`) signal every process of the job at once, DataLoader
workers included. A worker killed that way makes the DataLoader raise in the main process before it can checkpoint,
so the workers ignore both signals (`mm_llama.data.pipeline` starts them with `_worker_signals`) and leave the
decision to the main process, which shuts them down when it is done; a worker still exits when its parent dies.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """`with StopRequest() as stop:` … `stop.signal` is the number of the first stop signal received, or 0."""

    def __init__(self) -> None:
        self.signal = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal != 0

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
