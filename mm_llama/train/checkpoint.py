"""Training checkpoints: atomic directories `RUN/checkpoints/step_00000100/`, the last K kept.

A checkpoint is written into a temporary directory beside its final place and renamed when every file is on disk,
so a crash or a kill at any moment leaves either the complete new checkpoint or none: never a half one that looks
complete. `latest` only ever sees renamed directories.

Each directory holds the trained weights in mm-llama's format (`mm_llama.json` + safetensors, loadable on its own),
`train_state.pt` (optimizer, step, data position, RNG states) and `config.yaml` (the resolved run config).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from mm_llama.errors import CheckpointError

_STEP_RE = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.pt"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first (temporary directories are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_checkpoint_dir(run_dir: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Create `step_XXXXXXXX` atomically: `write(tmp_dir)` fills a temporary directory, which is then renamed.
    Older checkpoints beyond the newest `keep` are deleted afterwards."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.exists():
        raise CheckpointError(f"{final}: already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=root))
    try:
        write(tmp)
        _fsync_dir(tmp)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    """Flush file contents and the directory entry, so a renamed checkpoint survives a power cut too."""
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict:
    """Every random generator a training step may draw from (dropout, sampling, shuffles in Python code)."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # As a tensor, so that train_state.pt loads with weights_only=True (no numpy objects in the pickle).
    states["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    import numpy as np

    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def load_train_state(ckpt: Path) -> dict:
    file = ckpt / TRAIN_STATE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {ckpt} is not a training checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"{file}: cannot load ({type(e).__name__}: {e})") from None
