"""mm-llama's own checkpoint format (DESIGN §4): a directory with `mm_llama.json` and one safetensors file per part.

    mm_llama.json = {"format": "mm-llama", "version": 1,
                     "trunk": {"config": {...LlamaConfig...}, "weights": "trunk.safetensors"}
                            | {"checkpoint": "path/to/a/Meta/or/HF/directory"},
                     "parts": {"<part>": {"config": {...}, "weights": "<part>.safetensors"}, ...}}

A whole Llama 3.2 Vision model (`MMLlama`, written by `save_mmllama(fmt="ours")`) has two parts:

    "vision":        {"config": {...VisionConfig, no intermediate_mode...}, "weights": "vision.safetensors"}
                     holding `vision.*` and `vision_projection.{weight,bias}`;
    "image_adapter": {"config": {"n_layers": N}, "weights": "image_adapter.safetensors"}
                     holding `media.learnable_embedding.weight` and `image_adapter.cross_attention_layers.*`.

Part tensors keep their full `MMLlama` names; the semantics flags (`intermediate_mode`, `mask_attention_rows`) are
chosen when loading (`hf_compat`), not stored.

A stage that trains the trunk (`lm`) stores its weights here; a stage that trains an adapter stores only the adapter
and refers to the trunk checkpoint it was trained on. Tensor names are the module's own (Meta's, for the trunk).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mm_llama.checkpoints.common import read_json
from mm_llama.errors import CheckpointError
from mm_llama.llama import LlamaConfig

OURS_INDEX = "mm_llama.json"
FORMAT_VERSION = 1


def read_index(path: Path) -> dict:
    index = read_json(path / OURS_INDEX)
    if index.get("format") != "mm-llama" or index.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / OURS_INDEX}: not an mm-llama v{FORMAT_VERSION} index "
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


def read_ours_trunk(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]] | Path:
    """The trunk's (config, state dict) when stored here, or the path of the checkpoint it refers to."""
    trunk = read_index(path).get("trunk")
    if not isinstance(trunk, dict):
        raise CheckpointError(f"{path / OURS_INDEX}: no 'trunk' entry")
    if "checkpoint" in trunk:
        ref = Path(trunk["checkpoint"])
        return ref if ref.is_absolute() else path / ref
    config = LlamaConfig.from_dict(trunk.get("config", {}), source=f"{path / OURS_INDEX} (trunk.config)")
    return config, read_safetensors(path / trunk.get("weights", "trunk.safetensors"))


def write_ours(out: Path, *, trunk: dict, parts: dict[str, tuple[dict, dict[str, torch.Tensor]]] | None = None,
               trunk_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the index and weights into `out` (an existing, empty directory: callers make it atomic).

    Args:
        trunk: {"config": dict} when `trunk_weights` are stored here, else {"checkpoint": path}.
        parts: part name -> (config dict, state dict) of each trained part.
        trunk_weights: the trunk's state dict (Meta names), when the trunk itself was trained.
    """
    from safetensors.torch import save_file

    index = {"format": "mm-llama", "version": FORMAT_VERSION, "trunk": dict(trunk), "parts": {}}
    if trunk_weights is not None:
        index["trunk"]["weights"] = "trunk.safetensors"
        save_file({k: v.contiguous() for k, v in trunk_weights.items()}, str(out / "trunk.safetensors"))
    for name, (config, state) in (parts or {}).items():
        index["parts"][name] = {"config": config, "weights": f"{name}.safetensors"}
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))
    (out / OURS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_ours_parts(path: Path) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """Part name -> (config dict, state dict) of every part stored in an mm-llama directory."""
    parts = read_index(path).get("parts") or {}
    out = {}
    for name, entry in parts.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("config", {}), dict):
            raise CheckpointError(f"{path / OURS_INDEX}: part {name!r} must be {{'config': {{...}}, 'weights': ...}}")
        out[name] = (entry.get("config", {}), read_safetensors(path / entry.get("weights", f"{name}.safetensors")))
    return out


def has_part(path: Path, name: str) -> bool:
    return (path / OURS_INDEX).is_file() and name in (read_json(path / OURS_INDEX).get("parts") or {})
