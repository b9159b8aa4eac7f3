"""What the stages that add a part to a trained, frozen model share (`video-adapter`, `speech-adapter`): reading the
base model, building the larger model around it, and checkpoints that store the base's parts unchanged beside the
trained ones, the trunk by reference (so that each checkpoint loads as a whole model)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mm_llama.checkpoints.composed import read_ours_with_trunk_dir
from mm_llama.checkpoints.fingerprint import trunk_fingerprint
from mm_llama.checkpoints.ours import split_parts, trunk_reference, write_ours
from mm_llama.errors import CheckpointError
from mm_llama.llama import Llama
from mm_llama.model import MMConfig, MMLlama

__all__ = ["BaseModel", "read_base_model"]


@dataclass
class BaseModel:
    """A trained mm-llama checkpoint a stage builds on: its config, its tensors as stored (full names), the trunk
    checkpoint directory its weights come from with their fingerprint (for the trunk reference), and how the stage's
    config names it (`what`, e.g. "image_model demo": the start of every error about it)."""

    config: MMConfig
    state: dict[str, torch.Tensor]
    trunk_dir: Path
    fingerprint: str
    what: str

    def build(self, config: MMConfig, device: torch.device, new: tuple[str, ...]) -> MMLlama:
        """`config` (the base's with parts added) on `device` in fp32, with the base's weights; `CheckpointError`
        unless exactly the parts named in `new` are missing."""
        with torch.device(device):
            model = MMLlama(config, trunk=Llama(self.config.trunk))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in self.state.items()}, strict=False)
        missing = [k for k in missing if not k.startswith(_prefixes(new))]
        if missing or unexpected:
            raise CheckpointError(f"{self.what}: weights do not fit (missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]})")
        return model

    def save_with(self, out: Path, trainable: dict[str, torch.Tensor], config: MMConfig, tokenizer: Path) -> None:
        """Write `trainable` (full names) with the base's other parts as stored, the trunk by reference, and the
        tokenizer into `out`."""
        frozen = {k: v for k, v in self.state.items() if not k.startswith("trunk.") and k not in trainable}
        parts = split_parts({**frozen, **trainable}, config.part_configs())
        write_ours(out, trunk=trunk_reference(self.trunk_dir, out, self.fingerprint), parts=parts)
        shutil.copy2(tokenizer, out / "tokenizer.model")


def read_base_model(path: Path, what: str, accepted: str, trains: tuple[str, ...], announce: bool) -> BaseModel:
    """The mm-llama checkpoint at `path`; a `CheckpointError` that starts with `what` (e.g. "image_model demo") and
    ends with `accepted`, what the stage builds on (e.g. "a stage image-adapter checkpoint, or 'demo'").

    `trains` names the parts (`MMConfig` fields, e.g. "video_adapter") the stage trains from their initialisation. A
    base that has one already (the embedded model has every part) is read without it, config and tensors: the
    stage's new part takes its place, whatever its sizes, and no old weight is kept or saved with the new ones. With
    `announce` (the main rank), that is said in one line."""
    try:
        config, state, trunk_dir = read_ours_with_trunk_dir(path)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e} ({accepted})") from None
    replaced = [name for name in trains if getattr(config, name) is not None]
    if replaced:
        config = replace(config, **dict.fromkeys(replaced))
        state = {k: v for k, v in state.items() if not k.startswith(_prefixes(replaced))}
        if announce:
            print(f"{what} has a {' and a '.join(name.replace('_', ' ') for name in replaced)} already: the stage "
                  "trains new ones in their place, keeping none of their weights", flush=True)
    trunk_state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    fingerprint = trunk_fingerprint(trunk_state, tie_embeddings=config.trunk.tie_embeddings)
    return BaseModel(config, state, trunk_dir, fingerprint, what)


def _prefixes(parts) -> tuple[str, ...]:
    """The state-dict key prefixes of `parts` (MMConfig field names)."""
    return tuple(f"{name}." for name in parts)
