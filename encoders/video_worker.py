"""decord in a separate process, so that a file that makes it hang, crash or run away cannot take the caller along.

`DecodeWorker` keeps one process and reuses it across calls; a call that runs past its timeout kills it, and so do a
crash and an interrupted call; the next call starts a new one. The process is a fresh interpreter (`python -m
encoders.video_worker`), never a fork: the caller has torch threads, which a fork copies in an undefined state. It is
started with `subprocess`, not multiprocessing's "spawn" or "forkserver": those re-run the caller's `__main__` module in
the child (a training script without a main guard would start training again there, and a script read from stdin
cannot start one at all). It imports numpy and decord only; this module must not import torch or mm_llama (whose
package imports torch). The two ends talk through a `multiprocessing.connection` pipe.

The worker is a thin proxy for `decord.VideoReader`; which frames to read is decided by the caller:
    "probe" (path) -> (height, width) of frame 0 as decord decodes it (rotation applied), for containers whose header
        we do not read;
    "open" (path, width, height) -> {"n_total", "fps", "timestamps" (n_total, 2) float32 seconds}; keeps the reader;
    "read" (indices) -> uint8 frames (len(indices), H, W, 3) of the open reader, or {"decodable": m} when they do not
        decode (after `READ_ATTEMPTS` tries): decord counts packets, and the last ones may not give a frame (a corrupt
        tail, a last frame cut short), so we find how many leading frames do.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

START_TIMEOUT_S = 120.0  # importing decord in a fresh interpreter, on a loaded machine; never charged to a file
# Decoder threads. Measured on 360p and 8K clips (2 cores), 2 or "auto" threads were no faster than 1 for the few frames
# a clip gives; frame threads only add frames in flight (memory). Parallelism belongs to the data loader's workers.
DECODE_THREADS = 1
READ_ATTEMPTS = 3  # see `_batch`

_DECORD_PREFIX = re.compile(r"(\[[0-9:]+\] )?(\S+\.(cc|h):\d+: )*")  # "[11:41:42] /src/video_reader.cc:486: "


class DecodeError(RuntimeError):
    """decord could not read the file (the message is decord's), or the worker died on it."""


class DecodeWorker:
    """A decord process reused across calls; thread-safe (calls take turns)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        atexit.register(self.stop)  # a worker stuck in a decode would outlive the caller
        os.register_at_fork(after_in_child=self._forget)  # data loaders fork their workers

    @property
    def pid(self) -> int | None:
        """The running worker's process id (None before the first call and after a kill)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def call(self, op: str, *args, timeout_s: float):
        """Run one operation (see the module docstring) and return its result.

        Raises:
            TimeoutError: no answer within `timeout_s` seconds; the worker was killed.
            DecodeError: decord raised, or the worker died (its exit code is in the message).
        """
        with self._lock:
            if self.pid is None:
                self._start()
            try:
                self._conn.send((op, args))
                answered = self._conn.poll(timeout_s)  # also True when the process died: recv then raises EOFError
                if answered:
                    status, value = self._conn.recv()
            except (EOFError, OSError) as e:
                code = self._kill()
                raise DecodeError(f"the decoding process died (exit code {code})") from e
            except BaseException:
                self._kill()  # interrupted mid-call: its answer would be read by the next call
                raise
            if not answered:
                self._kill()
                raise TimeoutError(f"no answer within {timeout_s:g} s")
            if status == "error":
                raise DecodeError(value)
            return value

    def stop(self) -> None:
        """Stop the worker now (the next call starts a new one)."""
        with self._lock:
            self._kill()

    def _start(self) -> None:
        self._kill()  # a worker that died on its own leaves its pipe behind
        self._conn, child = Pipe()
        root = str(Path(__file__).resolve().parents[1])  # where `encoders` is, installed or not
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen([sys.executable, "-m", "encoders.video_worker", str(child.fileno())],
                                         pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL)
        child.close()
        ready = self._conn.poll(START_TIMEOUT_S)
        try:
            if ready and self._conn.recv() == "ready":  # decord imported
                return
        except EOFError:
            pass
        code = self._kill()
        raise DecodeError(f"the decoding process did not start (exit code {code}, after up to {START_TIMEOUT_S:g} s; "
                          "its error, if any, is on stderr)")

    def _forget(self) -> None:
        """In a forked child: the worker and its pipe are the parent's (answers would go to either process), and the
        lock may have been held by a thread that the fork left behind. Start afresh; the parent keeps its worker."""
        if self._conn is not None:
            self._conn.close()  # our copy only: the parent's end stays open
        self._process, self._conn, self._lock = None, None, threading.Lock()

    def _kill(self) -> int | None:
        process, self._process = self._process, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if process is None:
            return None
        process.kill()
        return process.wait()


# --- the worker process -----------------------------------------------------------------------------------------------


def _serve(conn: Connection) -> None:
    """The worker's loop: answer ("ok", result) or ("error", message) per request until the caller goes away."""
    import decord

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle; it kills us if it must
    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own log lines; the errors still reach the caller
    # decord's C++ log ("[13:23:01] video_reader.cc:83: ERROR opening: ...") writes straight to fd 2, before the
    # exception that reaches the caller as a clear message: from here on, our stderr goes nowhere (a start failure
    # above still shows; a crash shows as the exit code in the caller's error).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    conn.send("ready")
    state = {}
    while True:
        try:
            op, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", _OPS[op](state, *args)))
        except Exception as e:  # decord raises DECORDError, RuntimeError, AssertionError, IndexError
            conn.send(("error", _describe(e)))


def _describe(error: Exception) -> str:
    """decord's message without the time stamps and source locations it puts before the text that says what failed."""
    lines = str(error).strip().splitlines()
    return _DECORD_PREFIX.sub("", lines[-1]).strip()[:300] if lines else type(error).__name__


def _probe(state: dict, path: str) -> tuple[int, int]:
    import decord

    state.clear()
    frame = decord.VideoReader(path, num_threads=DECODE_THREADS).next().asnumpy()  # (H, W, 3)
    return frame.shape[0], frame.shape[1]


def _open(state: dict, path: str, width: int, height: int) -> dict:
    state.clear()
    state.update(path=path, width=width, height=height)
    reader = _reader(state)
    state["reader"] = reader
    n = len(reader)
    return {"n_total": n, "fps": float(reader.get_avg_fps()),
            "timestamps": np.asarray(reader.get_frame_timestamp(np.arange(n)), dtype=np.float32)}


def _reader(state: dict):
    import decord

    return decord.VideoReader(state["path"], width=state["width"], height=state["height"], num_threads=DECODE_THREADS)


def _read(state: dict, indices: list[int]) -> np.ndarray | dict:
    """The frames at `indices`, or {"decodable": m} with m <= max(indices) when some of them do not decode."""
    frames = _batch(state, indices)
    return frames if frames is not None else {"decodable": _decodable(state, max(indices))}


def _batch(state: dict, indices: list[int]) -> np.ndarray | None:
    """get_batch, tried up to READ_ATTEMPTS times (a fresh reader after a failure); None if every try fails.

    decord's reader thread reads packets ahead of its decoder thread, as far as the end of a small file, and an error
    on *any* packet it has queued (a corrupt frame well after the ones asked for) fails the call, or not, depending on
    which thread gets there first. Trying again is how to tell "does not decode" from "lost that race".
    """
    for _ in range(READ_ATTEMPTS):
        try:
            state["reader"] = state["reader"] or _reader(state)
            return state["reader"].get_batch(indices).asnumpy()  # (len(indices), H, W, 3) uint8
        except Exception:
            state["reader"] = None  # its decoder may be left in an error state
    return None


def _decodable(state: dict, failing: int) -> int:
    """How many leading frames decode, given that frame `failing` does not: gallop back from it (1, 2, 4, … frames)
    to a frame that decodes, then bisect between the two; a corrupt tail of t frames costs about 2 log2(t) tries."""
    step = 1
    while True:
        good = max(failing - step, 0)
        if _batch(state, [good]) is not None:
            break
        if good == 0:
            return 0
        failing, step = good, 2 * step
    while failing - good > 1:  # frame `good` decodes, frame `failing` does not
        mid = (good + failing) // 2
        good, failing = (mid, failing) if _batch(state, [mid]) is not None else (good, mid)
    return failing


_OPS = {"probe": _probe, "open": _open, "read": _read}


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
