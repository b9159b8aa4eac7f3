"""One run per run directory: an advisory lock on `RUN/.lock`, held while the run is alive.

Two runs writing the same directory would interleave `log.jsonl` and race on checkpoints. `flock` is released by the
kernel when the process dies, however it dies (SIGKILL, OOM killer, power loss), so a crashed run never leaves the
directory locked; the pid, host and start time written into the file only make the refusal readable.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from mm_llama.errors import TrainingError

LOCK_FILE = ".lock"


class RunLock:
    """`with RunLock(run_dir):` holds the run directory's lock, or raises `TrainingError` naming the live run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainingError(f"cannot create the run lock {self.path}: {e.strerror}; is train.out_dir writable?"
                                ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise TrainingError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end, stop "
                                "it, or set --train.out_dir to another directory") from None
        except OSError as e:  # e.g. a file system without locks
            os.close(fd)
            raise TrainingError(f"cannot lock {self.path}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (deleting it would race with a new run)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
