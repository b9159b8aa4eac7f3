"""Paths a user passes (checkpoints, images, tokenizers): local files only, and said so.

`Path("https://example.com/cat.jpg")` silently becomes `https:/example.com/cat.jpg`, and the error that follows
("does not exist") sends the user looking for a file. mm-llama never downloads anything (no model hub, no URL), so a
URL is refused up front with what to do instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mm_llama.errors import InputError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(value: object, what: str) -> Path:
    """`value` (str, Path or os.PathLike) as a `Path`; `InputError` for a URL or for something that is not a path.

    Args:
        what: what the path is for ("image", "checkpoint directory"), named in the error.
    """
    if isinstance(value, str) and _URL.match(value):
        raise InputError(f"{what} {value}: URLs are not fetched; download it first and pass the local path")
    if not isinstance(value, str | os.PathLike):
        raise InputError(f"{what} must be a path (str or pathlib.Path), got {type(value).__name__}")
    return Path(value)


# Models that ship inside the package, by name -> their folder in `mm_llama/`. A bare name always means the shipped
# model (a local folder of that name is "./demo"), so that the same command means the same thing in any directory.
EMBEDDED_MODELS = {"demo": "demo_model"}


def checkpoint_path(value: object, what: str = "checkpoint directory") -> Path:
    """A checkpoint argument as a directory: an embedded model's name ("demo") or a local path (`local_path`)."""
    if isinstance(value, str) and value in EMBEDDED_MODELS:
        return Path(__file__).parent / EMBEDDED_MODELS[value]
    return local_path(value, what)
