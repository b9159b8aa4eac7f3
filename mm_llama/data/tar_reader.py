"""Reading one webdataset shard (an uncompressed tar) into samples, without losing the rest of a damaged shard.

`tarfile` in stream mode silently ends the archive at the first bad header, losing the rest of the shard unseen; this
reader yields one `Damage` per damaged region and goes on at the next block that parses as a header. The pipeline
(`pipeline.py`) counts each `Damage` as a skipped sample.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import NamedTuple

from webdataset.gopen import gopen

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# Members whose data blocks describe the next member (GNU long name/link, pax headers) rather than being a file.
_EXTENSION_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)


class Damage(NamedTuple):
    """A region of a shard that yields no sample: a corrupt header, a cut-off archive, a duplicate member."""

    reason: str


def _tar_members(stream) -> Iterator[tuple[str, bytes] | Damage]:
    """Regular files of an uncompressed tar stream as (name, data), and a `Damage` per damaged region.

    `tarfile` in stream mode silently ends the archive at the first bad header, losing the rest of the shard unseen;
    here a bad header yields one `Damage` and reading resumes at the next block that parses as a header.
    """
    long_name, damaged = None, False
    while True:
        block = stream.read(_BLOCK)  # buffered streams return short reads only at the end
        if len(block) < _BLOCK:
            if block and not damaged:
                yield Damage("the archive ends inside a header (truncated shard)")
            return
        if block == _ZERO_BLOCK:  # end-of-archive marker or record padding; a concatenated archive may follow
            continue
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            if not damaged:
                yield Damage("corrupt tar header (bad checksum or field)")
            damaged = True
            continue
        damaged = False
        has_data = info.isreg() or info.type in _EXTENSION_TYPES or info.type not in tarfile.SUPPORTED_TYPES
        size = info.size if has_data else 0
        data = stream.read(-(-size // _BLOCK) * _BLOCK)
        if len(data) < size:
            yield Damage(f"the archive ends inside member {long_name or info.name} (truncated shard)")
            return
        data = data[:size]
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):  # records "<len> <key>=<value>\n"
            paths = [r.partition(b" ")[2][5:] for r in data.split(b"\n") if r.partition(b" ")[2].startswith(b"path=")]
            long_name = paths[-1].decode("utf-8", "surrogateescape") if paths else long_name
        elif info.type not in _EXTENSION_TYPES:
            name, long_name = long_name or info.name, None
            if info.isreg():
                yield name, data


def read_shard(url: str) -> Iterator[dict | Damage]:
    """Samples of a shard: consecutive members with one key ("dir/000001" of "dir/000001.seg.txt") → {ext: bytes}."""
    sample = None
    try:
        with gopen(url, "rb") as stream:
            for member in _tar_members(stream):
                if isinstance(member, Damage):
                    yield member
                    continue
                name, data = member
                folder, _, base = name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or not stem or stem.startswith("__"):  # no extension, or metadata like __key__.txt
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample.get("__bad__", sample)
                    sample = {"__key__": key, "__url__": url}
                ext = ext.lower()
                if ext in sample:  # the whole sample is dropped (counted once): which of the two is right is unknowable
                    sample.setdefault("__bad__", Damage(f"sample {key} has two '{ext}' members"))
                sample[ext] = data
    except OSError as e:  # cannot open, or a read error: the rest of the shard is lost
        yield Damage(f"cannot read the shard: {e.strerror or e}")
    if sample is not None:
        yield sample.get("__bad__", sample)
