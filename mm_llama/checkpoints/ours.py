"""mm-llama's own checkpoint format (DESIGN §4): a directory with `mm_llama.json` and one safetensors file per part.

    mm_llama.json = {"format": "mm-llama", "version": 2,
                     "trunk": {"config": {...LlamaConfig...}, "weights": "trunk.safetensors"}
                            | {"checkpoint": "../../../lm/checkpoints/step_00003000", "absolute": "/runs/lm/...",
                               "fingerprint": "sha256-bf16-3x1024:..."},
                     "parts": {"<part>": {"config": {...}, "weights": "<part>.safetensors"}, ...}}

The format is generic over parts: a part is a module of `MMLlama` other than the trunk (`MMLlama.parts()`: e.g.
"vision", "vision_projection", "image_adapter", "media"), and its tensors keep their full `MMLlama` names, so a
reader merges every part's file by name and a part that a later stage adds needs no code here. A part's config is
the `MMConfig` field of the same name (parts such as the projection have none); the fields that choose Meta's or
transformers' semantics are chosen when loading (`hf_compat`), never stored.

A stage that trains the trunk (`lm`) stores its weights here; a stage that trains an adapter stores only its parts
and refers to the trunk checkpoint it was trained on (`TrunkReference`): by its path relative to the checkpoint
directory (so run directories moved or copied together keep working), by its absolute path (so the adapter's run alone
may move), and by the fingerprint of its weights (`fingerprint.py`), so that a reader takes only that trunk and says
what it looked for when it cannot find it. References written before fingerprints hold only "checkpoint" (absolute or
relative) and are still read. `mm-llama export` (`export_checkpoint`) writes a self-contained copy with the trunk
stored. Other writers (the `vision-pretrain` stage) store parts that
are not `MMLlama`'s with the low-level `write_ours`.

Version 1 (before the per-aspect-ratio tile tables) stored the ViT's three tile embeddings as Meta's [M, M, ...]
grids and grouped the projection with "vision" and the media rows with "image_adapter"; it is read and upgraded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_llama.checkpoints.common import read_json
from mm_llama.errors import CheckpointError
from mm_llama.llama import LlamaConfig

OURS_INDEX = "mm_llama.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def read_index(path: Path) -> dict:
    index = read_json(path / OURS_INDEX)
    if index.get("format") != "mm-llama" or index.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path / OURS_INDEX}: not an mm-llama index of version {READABLE_VERSIONS} "
                              f"(format={index.get('format')!r}, version={index.get('version')!r})")
    return index


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file}: missing (named in {OURS_INDEX})")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise CheckpointError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class TrunkReference:
    """Where an adapter checkpoint's trunk is to be found: `candidates` in the order to try (the path relative to the
    checkpoint directory, then the absolute one, each resolved), and the fingerprint its weights must have (None in
    references written before fingerprints: the first candidate that exists is taken). `index` names the
    mm_llama.json that holds it, for messages."""

    index: Path
    candidates: tuple[Path, ...]
    fingerprint: str | None


def trunk_reference(trunk: Path, out: Path, fingerprint: str) -> dict:
    """The index entry by which the checkpoint written into `out` refers to the trunk checkpoint `trunk`. `out` may be
    the temporary directory beside the final one: the relative path is the same for both."""
    trunk = trunk.resolve()
    try:
        relative = os.path.relpath(trunk, out.resolve())
    except ValueError:  # on another drive (Windows): no relative path exists
        relative = str(trunk)
    return {"checkpoint": relative, "absolute": str(trunk), "fingerprint": fingerprint}


def _read_reference(entry: dict, path: Path) -> TrunkReference:
    places = [entry["checkpoint"], *([entry["absolute"]] if "absolute" in entry else [])]
    fingerprint = entry.get("fingerprint")
    if not all(isinstance(p, str) and p for p in places) or not isinstance(fingerprint, str | None):
        raise CheckpointError(f"{path / OURS_INDEX}: a trunk reference is {{'checkpoint': relative path, 'absolute': "
                              f"path, 'fingerprint': str}} (only 'checkpoint' in older ones), got {entry}")
    candidates: list[Path] = []
    for place in places:
        candidate = (path / place).resolve()  # an absolute `place` replaces `path`
        if candidate not in candidates:
            candidates.append(candidate)
    return TrunkReference(path / OURS_INDEX, tuple(candidates), fingerprint)


def read_ours_trunk(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]] | TrunkReference:
    """The trunk's (config, state dict) when stored here, or the reference to the checkpoint that holds it (which
    `trunk.read_referenced_trunk` follows)."""
    trunk = read_index(path).get("trunk")
    if not isinstance(trunk, dict):
        raise CheckpointError(f"{path / OURS_INDEX}: no 'trunk' entry")
    if not trunk:
        parts = sorted(read_index(path).get("parts") or {})
        raise CheckpointError(f"{path / OURS_INDEX}: stores no trunk, only parts {parts} (a vision-pretrain "
                              "checkpoint: the image-adapter stage starts its ViT from it with init_vision)")
    if "checkpoint" in trunk:
        return _read_reference(trunk, path)
    config = LlamaConfig.from_dict(trunk.get("config", {}), source=f"{path / OURS_INDEX} (trunk.config)")
    return config, read_safetensors(path / trunk.get("weights", "trunk.safetensors"))


def read_ours_parts(path: Path, names: Collection[str] | None = None
                    ) -> dict[str, tuple[dict | None, dict[str, torch.Tensor]]]:
    """Part name -> (stored config or None, tensors by full name) of every part of an mm-llama directory (or only of
    those in `names`: the others' weights are not read), upgraded to the current version."""
    index = read_index(path)
    out = {}
    for name, entry in (index.get("parts") or {}).items():
        if names is not None and name not in names:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("config", {}), dict):
            raise CheckpointError(f"{path / OURS_INDEX}: part {name!r} must be {{'config': {{...}}, 'weights': ...}}")
        tensors = read_safetensors(path / entry.get("weights", f"{name}.safetensors"))
        if index["version"] == 1:
            tensors = _upgrade_v1(tensors)
        out[name] = (entry.get("config"), tensors)
    return out


def _upgrade_v1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Version 1 kept the ViT's tile embeddings as Meta's grids; version 2 keeps per-aspect-ratio tables."""
    from encoders.vision_blocks import grid_to_table
    from mm_llama.checkpoints.mllama_meta import TILE_TABLES

    return {k: grid_to_table(v) if k in TILE_TABLES else v for k, v in tensors.items()}


def write_ours(out: Path, *, trunk: dict, parts: dict[str, tuple[dict | None, dict[str, torch.Tensor]]] | None = None,
               trunk_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the index and weights into `out` (an existing, empty directory: callers make it atomic).

    Args:
        trunk: {"config": dict} when `trunk_weights` are stored here, else a reference (`trunk_reference`), or {}
            for a directory of parts that belong to no trunk.
        parts: part name -> (config dict or None, state dict by full name) of each stored part.
        trunk_weights: the trunk's state dict (Meta names), when the trunk itself is stored.
    """
    from safetensors.torch import save_file

    index = {"format": "mm-llama", "version": FORMAT_VERSION, "trunk": dict(trunk), "parts": {}}
    if trunk_weights is not None:
        index["trunk"]["weights"] = "trunk.safetensors"
        save_file({k: v.contiguous() for k, v in trunk_weights.items()}, str(out / "trunk.safetensors"))
    for name, (config, state) in (parts or {}).items():
        entry = {"weights": f"{name}.safetensors"}
        if config is not None:
            entry = {"config": config, **entry}
        index["parts"][name] = entry
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))
    (out / OURS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def split_parts(state: dict[str, torch.Tensor], configs: dict[str, dict]
                ) -> dict[str, tuple[dict | None, dict[str, torch.Tensor]]]:
    """The parts of a composed model's non-trunk tensors (full names): one per top-level module, with its stored
    config (`MMConfig.part_configs`) where it has one."""
    parts: dict[str, tuple[dict | None, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        name = key.split(".", 1)[0]
        if name == "trunk":
            raise CheckpointError(f"{key}: trunk tensors are stored as the trunk, not as a part")
        parts.setdefault(name, (configs.get(name), {}))[1][key] = value
    if missing := sorted(configs.keys() - parts.keys()):
        raise CheckpointError(f"parts {missing} have a config but no tensors")
    return parts
