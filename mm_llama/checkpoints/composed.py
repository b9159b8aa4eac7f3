"""Every checkpoint directory as a composed model (`MMLlama`): detection, strict loading, writing, conversion.

| format | trunk only | with parts |
| --- | --- | --- |
| Meta | `params.json` + `consolidated.NN.pth` (`meta.py`) | Llama 3.2 Vision: `vision_*` fields (`mllama_meta.py`) |
| Hugging Face | `config.json`, model_type "llama" (`hf.py`) | Mllama: model_type "mllama" (`mllama_hf.py`) |
| mm-llama | `mm_llama.json` with a trunk | any parts (`ours.py`), the trunk stored or referenced |

Each reader gives (`MMConfig`, state dict with `MMLlama`'s names); one loader builds the model on the meta device and
assigns the memory-mapped tensors strictly. `export_checkpoint` turns an mm-llama directory that refers to its trunk
into a self-contained one, to copy or share alone.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from mm_llama.checkpoints.common import read_json
from mm_llama.checkpoints.hf import HF_CONFIG
from mm_llama.checkpoints.mllama_hf import read_hf_mllama, write_hf_mllama
from mm_llama.checkpoints.mllama_meta import is_meta_mllama, read_meta_mllama, write_meta_mllama
from mm_llama.checkpoints.ours import (
    OURS_INDEX,
    TrunkReference,
    read_ours_parts,
    read_ours_trunk,
    split_parts,
    write_ours,
)
from mm_llama.checkpoints.trunk import (
    assign_state,
    atomic_directory,
    check_tokenizer_vocab,
    detect_format,
    read_checkpoint,
    read_referenced_trunk,
    tokenizer_candidates,
    write_trunk,
)
from mm_llama.devices import check_dtype, resolve_device
from mm_llama.errors import CheckpointError
from mm_llama.model import MMConfig, MMLlama
from mm_llama.paths import checkpoint_path

FORMATS = ("meta", "hf", "ours")


def is_hf_mllama(path: Path) -> bool:
    return (path / HF_CONFIG).is_file() and read_json(path / HF_CONFIG).get("model_type") == "mllama"


def read_composed(path: Path, *, hf_compat: bool = False) -> tuple[str, MMConfig, dict[str, torch.Tensor]]:
    """(format, config with the chosen semantics, `MMLlama` state dict) of any checkpoint directory; tensors stay
    memory-mapped where the format allows."""
    fmt = detect_format(path)
    if fmt == "ours":
        config, state = read_ours_composed(path)
    elif fmt == "meta" and is_meta_mllama(path):
        config, state = read_meta_mllama(path)
    elif fmt == "hf" and is_hf_mllama(path):
        config, state = read_hf_mllama(path)
    else:
        _, trunk, trunk_state = read_checkpoint(path)
        config, state = MMConfig(trunk=trunk), {f"trunk.{k}": v for k, v in trunk_state.items()}
    return fmt, config.with_semantics(hf_compat), state


def read_ours_composed(path: Path) -> tuple[MMConfig, dict[str, torch.Tensor]]:
    """An mm-llama directory: its trunk (stored here or read from the checkpoint it refers to) and every part."""
    return _read_ours(path, None)[:2]


def read_ours_with_trunk_dir(path: Path) -> tuple[MMConfig, dict[str, torch.Tensor], Path]:
    """`read_ours_composed`, and the directory the trunk's weights were read from: the trunk checkpoint `path` refers
    to, or `path` itself when it stores them (what a later stage refers to as its trunk)."""
    config, state, trunk_dir = _read_ours(path, None)
    return config, state, trunk_dir if trunk_dir is not None else path


def _read_ours(path: Path, trunk_dir: Path | None) -> tuple[MMConfig, dict[str, torch.Tensor], Path | None]:
    """`read_ours_composed` (with the trunk read from `trunk_dir` when given), and the trunk checkpoint directory it
    read (None when the trunk is stored)."""
    index = path / OURS_INDEX
    trunk_entry = read_ours_trunk(path)
    if isinstance(trunk_entry, TrunkReference):
        if trunk_dir is not None:  # still verified against the reference's fingerprint
            trunk_entry = replace(trunk_entry, candidates=(trunk_dir.resolve(),))
        _, trunk, trunk_state, trunk_dir = read_referenced_trunk(trunk_entry)
    elif trunk_dir is not None:
        raise CheckpointError(f"{path}: stores its trunk's weights; a trunk directory ({trunk_dir}) is only taken "
                              "for a checkpoint that refers to its trunk")
    else:
        trunk, trunk_state = trunk_entry
    state = {f"trunk.{k}": v for k, v in trunk_state.items()}
    configs = {}
    for name, (config, tensors) in read_ours_parts(path).items():
        if config is not None:
            configs[name] = config
        if overlap := sorted(state.keys() & tensors.keys()):
            raise CheckpointError(f"{index}: part {name!r} repeats tensors {overlap[:5]}")
        state |= tensors
    return MMConfig.from_parts(trunk, configs, source=str(index)), state, trunk_dir


def load_mmllama(path: str | Path, *, hf_compat: bool = False, dtype: torch.dtype | None = torch.bfloat16,
                 device: torch.device | str = "cpu") -> MMLlama:
    """`MMLlama.from_pretrained`: any checkpoint directory, built on the meta device and assign-loaded strictly."""
    path, device = checkpoint_path(path), resolve_device(device)
    check_dtype(dtype)
    fmt, config, state = read_composed(path, hf_compat=hf_compat)
    check_tokenizer_vocab(path, config.trunk)
    with torch.device("meta"):
        model = MMLlama(config)
    assign_state(model, state, f"{path} ({fmt} format)", tied=config.trunk.tie_embeddings, prefix="trunk.",
                 dtype=dtype, device=device)
    model.trunk.tie_weights()
    for module in model.modules():  # RoPE tables are not stored: each part that has one builds it on its device
        if module is not model and hasattr(module, "reset_rope"):
            module.reset_rope()
    model.source = path
    return model.eval()


def write_composed(state: dict[str, torch.Tensor], config: MMConfig, out: Path, *, fmt: str, n_shards: int = 1,
                   extra_files: tuple[Path, ...] = ()) -> None:
    """Write an `MMLlama` state dict as a Meta, HF or mm-llama directory: all or nothing (temp dir + rename)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; accepted: {', '.join(map(repr, FORMATS))}")
    if fmt != "meta" and n_shards != 1:
        raise CheckpointError(f"n_shards={n_shards}: model-parallel shards exist only in Meta's format")
    if fmt != "ours" and config.video_adapter is not None:
        raise CheckpointError(f"Meta's and Hugging Face's formats have no video adapter (nobody released one): save "
                              f"this model with fmt='ours', not {fmt!r}")
    trunk_state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    rest = {k: v for k, v in state.items() if not k.startswith("trunk.")}
    with atomic_directory(Path(out)) as tmp:
        if fmt == "ours":
            write_ours(tmp, trunk={"config": config.trunk.to_dict()}, trunk_weights=trunk_state,
                       parts=split_parts(rest, config.part_configs()))
        elif not config.has_media:
            write_trunk(trunk_state, config.trunk, tmp, fmt=fmt, n_shards=n_shards)
        elif fmt == "meta":
            write_meta_mllama(state, config, tmp, n_shards)
        else:
            write_hf_mllama(state, config, tmp)
        for extra in extra_files:
            shutil.copy2(extra, tmp / extra.name)


def save_mmllama(model: MMLlama, out: str | Path, *, fmt: str = "ours", n_shards: int = 1) -> None:
    """Write `model` as a Meta ("meta", `n_shards` model-parallel files), Hugging Face ("hf") or mm-llama ("ours")
    directory, atomically (`out` must not exist). Meta's and HF's formats hold a trunk or Llama 3.2 Vision."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.trunk.tie_embeddings:  # stored once, as the embedding
        state.pop("trunk.output.weight")
    write_composed(state, model.config, Path(out), fmt=fmt, n_shards=n_shards)


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: str | None = None, n_shards: int = 1) -> str:
    """Convert a checkpoint directory Meta <-> HF <-> ours without changing a bit of the weights that any input
    reaches; returns the format written (by default Meta -> HF, anything else -> Meta). A tokenizer.model next to
    the weights is copied along."""
    src = Path(src)
    fmt, config, state = read_composed(src)
    to = to or ("hf" if fmt == "meta" else "meta")
    extras = tuple(p for p in tokenizer_candidates(src) if p.is_file())[:1]
    write_composed(state, config, Path(dst), fmt=to, n_shards=n_shards, extra_files=extras)
    return to


def export_checkpoint(src: str | Path, dst: str | Path, *, trunk: str | Path | None = None) -> Path | None:
    """Write the mm-llama directory `src` as a self-contained one at `dst` (which must not exist): the trunk's weights
    and every part stored, with the tokenizer.model (`src`'s, else the trunk's), all or nothing. `dst` loads anywhere
    on its own, with the same logits as `src`.

    Args:
        trunk: the trunk checkpoint directory to read instead of the one `src` refers to (moved, deleted by a run's
            keep_checkpoints rotation); its weights must have the fingerprint the reference recorded (a reference
            written before fingerprints cannot check it).

    Returns:
        The trunk checkpoint directory the weights came from, or None when `src` stored them already.
    """
    src, dst = Path(src), Path(dst)
    if detect_format(src) != "ours":
        raise CheckpointError(f"{src}: not an mm-llama directory ({OURS_INDEX}); a Meta or Hugging Face checkpoint "
                              "is self-contained already (`mm-llama convert --to ours` rewrites it as one)")
    config, state, trunk_dir = _read_ours(src, Path(trunk) if trunk is not None else None)
    tokenizers = [*tokenizer_candidates(src), *(tokenizer_candidates(trunk_dir) if trunk_dir else ())]
    extras = tuple(p for p in tokenizers if p.is_file())[:1]
    write_composed(state, config, dst, fmt="ours", extra_files=extras)
    return trunk_dir
