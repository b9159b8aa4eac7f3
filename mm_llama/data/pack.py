"""`mm-llama data pack`: a JSONL list of samples → webdataset shards.

Members written per sample (key `f"{i:09d}"`, i = the sample's index):
    text    txt
    image   jpg | png (the file's bytes), txt (a caption), json ({"question", "answer"})
    video   mp4, txt, json ({"question", "answer"})
    speech  flac | wav, txt (the transcript or target), json ({"task", "language"}) when given
Relative paths in the list are relative to the list's folder. Every line is checked before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from mm_llama.errors import InputError

__all__ = ["KINDS", "pack", "write_shards"]

# kind → (the media key of a line, file suffix → member name)
_MEDIA = {
    "image": ("image", {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}),
    "video": ("video", {".mp4": "mp4"}),
    "speech": ("audio", {".flac": "flac", ".wav": "wav"}),
}
_ACCEPTED = {
    "text": '{"text": "..."} or {"txt": "path/to/file.txt"}',
    "image": '{"image": "a.jpg|a.png", "text": "caption"} and/or "question" + "answer"',
    "video": '{"video": "clip.mp4", "text": "caption"} and/or "question" + "answer"',
    "speech": '{"audio": "a.flac|a.wav", "text": "...", optional "task" and "language"}',
}
_KEYS = {
    "text": {"text", "txt"},
    "image": {"image", "text", "question", "answer"},
    "video": {"video", "text", "question", "answer"},
    "speech": {"audio", "text", "task", "language"},
}
KINDS = tuple(_ACCEPTED)


class _BadLine(Exception):
    pass


def _string(record: dict, key: str, *, required: bool) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise _BadLine(f"missing key '{key}'")
    if not isinstance(value, str) or not value.strip():
        raise _BadLine(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _file(record: dict, key: str, suffixes: dict[str, str], folder: Path) -> tuple[str, Path]:
    """(member name, path) of the file `record[key]` names; it must exist and have an accepted suffix."""
    path = folder / _string(record, key, required=True)
    member = suffixes.get(path.suffix.lower())
    if member is None:
        raise _BadLine(f"'{key}' must be a {'/'.join(suffixes)} file, got {path.name}")
    if not path.is_file():
        raise _BadLine(f"'{key}' file {path} does not exist")
    return member, path


def _plan(kind: str, record: object, folder: Path) -> dict[str, bytes | Path]:
    """Check one line; returns member name → bytes to write or a file to copy."""
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _KEYS[kind])
    if unknown:
        raise _BadLine(f"unknown key(s) {unknown}")
    members: dict[str, bytes | Path] = {}
    if kind == "text":
        if ("text" in record) == ("txt" in record):
            raise _BadLine("give exactly one of 'text' and 'txt'")
        if "text" in record:
            return {"txt": _string(record, "text", required=True).encode("utf-8")}
        _, path = _file(record, "txt", {".txt": "txt"}, folder)
        try:  # a file that is not UTF-8 would only become a skipped sample at training time
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadLine(f"'txt' file {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
        return {"txt": path}
    key, suffixes = _MEDIA[kind]
    member, members[member] = _file(record, key, suffixes, folder)
    text = _string(record, "text", required=kind == "speech")
    if text is not None:
        members["txt"] = text.encode("utf-8")
    if kind == "speech":
        fields = {k: _string(record, k, required=False) for k in ("task", "language") if k in record}
    else:
        if ("question" in record) != ("answer" in record):
            raise _BadLine("'question' and 'answer' go together")
        fields = {k: _string(record, k, required=True) for k in ("question", "answer") if k in record}
        if text is None and not fields:
            raise _BadLine("missing text: give 'text' (a caption) and/or 'question' + 'answer'")
    if fields:
        members["json"] = json.dumps(fields, ensure_ascii=False).encode("utf-8")
    return members


def write_shards(out: Path, prefix: str, samples: Iterable[dict[str, bytes]], *, shard_size: int, total: int,
                 desc: str) -> list[Path]:
    """Write samples ({member: bytes}) with keys f"{i:09d}" to `out/{prefix}-%06d.tar`, with a progress bar.

    Args:
        out: the folder (created); it must not already hold `{prefix}-*.tar`, which a directory `shards:` setting
            would mix with the new ones.
        prefix: shard name prefix.
        samples: the samples, in order.
        shard_size: samples per shard.
        total, desc: for the progress bar.
    Returns:
        the shard paths.
    """
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise InputError(f"shard_size must be a positive integer, got {shard_size!r}")
    out = Path(out)
    old = sorted(out.glob(f"{prefix}-*.tar")) if out.is_dir() else []
    if old:
        raise InputError(f"{out} already holds shards ({old[0].name}, …); remove them or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    # encoder=False: members are bytes already. A fixed integer mtime makes the shards byte-identical for the same
    # input and plain ustar (the writer's float time.time() costs a pax header, 1 KiB, per member).
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=0) as sink:
        for i, sample in enumerate(tqdm(samples, total=total, desc=desc, unit="sample")):
            sink.write({"__key__": f"{i:09d}", **sample})
        n_shards = sink.shard  # read before close(), which deletes it
    return [Path(pattern % i) for i in range(n_shards)]


def _read(plans: list[dict[str, bytes | Path]]) -> Iterator[dict[str, bytes]]:
    for plan in plans:
        yield {k: v.read_bytes() if isinstance(v, Path) else v for k, v in plan.items()}


def pack(kind: str, input: Path, out: Path, *, shard_size: int = 1000, prefix: str | None = None) -> list[Path]:
    """Pack the samples listed in a JSONL file into webdataset shards.

    Args:
        kind: "text", "image", "video" or "speech" (line formats in the module docstring and `_ACCEPTED`).
        input: the JSONL list, one sample per line (blank lines are ignored).
        out: output folder; shards are `out/{prefix or kind}-000000.tar`, ….
        shard_size: samples per shard.
        prefix: shard name prefix (default: `kind`).
    Returns:
        the shard paths. `InputError` naming the file, the line and what is accepted for a bad line; every line is
        checked before anything is written.
    """
    if kind not in _ACCEPTED:
        raise InputError(f"unknown kind {kind!r}; accepted: {', '.join(KINDS)}")
    input = Path(input)
    try:
        lines = input.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the sample list {input}: {getattr(e, 'strerror', None) or e}") from None
    plans, accepted = [], _ACCEPTED[kind]
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _BadLine(f"not valid JSON ({e.msg} at column {e.colno})") from None
            plans.append(_plan(kind, record, input.parent))
        except _BadLine as e:
            raise InputError(f"{input}, line {lineno}: {e}; accepted lines for kind {kind!r}: {accepted}") from None
    if not plans:
        raise InputError(f"{input} lists no samples; accepted lines for kind {kind!r}: {accepted}")
    return write_shards(Path(out), prefix or kind, _read(plans), shard_size=shard_size, total=len(plans),
                        desc=f"pack {kind}")
