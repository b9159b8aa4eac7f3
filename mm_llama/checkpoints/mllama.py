"""Llama 3.2 Vision checkpoints in Hugging Face's format (`config.json` with model_type "mllama" + safetensors) ->
`MMLlama`. Both the hub's tensor names (`language_model.model.*`, `vision_model.*`, `multi_modal_projector.*`,
`language_model.lm_head.weight`) and the runtime names of transformers >= 4.52 (`model.language_model.*`, …) load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.cross_attention import CrossAttentionConfig, fusion_schedule
from mm_llama.checkpoints.common import read_json
from mm_llama.checkpoints.hf import HF_CONFIG, _hf_weight_files, _open_safetensors
from mm_llama.checkpoints.hf_config import hf_config_to_llama
from mm_llama.checkpoints.mllama_hf import mmllama_state_from_hf
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.llama import LlamaConfig

# Hub name prefix -> runtime name prefix (transformers' own `_checkpoint_conversion_mapping`, as data).
_HUB_TO_RUNTIME = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                   ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector.")]
# Text-config keys with no effect on the computation, or already read through the llama mapping.
_TEXT_ONLY_KEYS = {"cross_attention_layers", "dropout", "model_type", "use_cache", "initializer_range"}


def is_hf_mllama(path: Path) -> bool:
    return (path / HF_CONFIG).is_file() and read_json(path / HF_CONFIG).get("model_type") == "mllama"


def mllama_configs(config: dict, *, source: str, hf_compat: bool):
    """(trunk LlamaConfig, VisionConfig, CrossAttentionConfig) of an HF Mllama config.json."""
    from encoders.vision_hf import vision_config_from_hf

    text = dict(config.get("text_config") or {})
    cross = list(text.get("cross_attention_layers") or [])
    if not cross:
        raise ConfigError(f"{source}: text_config.cross_attention_layers is empty")
    n_self = text["num_hidden_layers"] - len(cross)
    llama = {k: v for k, v in text.items() if k not in _TEXT_ONLY_KEYS}
    llama |= {"model_type": "llama", "num_hidden_layers": n_self}
    trunk = hf_config_to_llama(llama, source=f"{source} (text_config)")
    schedule = fusion_schedule(n_self, len(cross))
    expected = [layer + j for j, layer in enumerate(schedule)]
    if cross != expected:
        raise ConfigError(f"{source}: cross_attention_layers {cross} do not follow Llama 3.2's schedule "
                          f"({expected} for {n_self} self-attention and {len(cross)} cross-attention layers)")
    if config.get("image_token_index", trunk.vocab_size) != trunk.vocab_size:
        raise ConfigError(f"{source}: image_token_index {config['image_token_index']} is not the first row above "
                          f"the vocabulary ({trunk.vocab_size})")
    vision = vision_config_from_hf(config.get("vision_config") or {}, intermediate_mode="output" if hf_compat
                                   else "input")
    return trunk, vision, CrossAttentionConfig(n_layers=len(cross), mask_attention_rows=not hf_compat)


def read_hf_mllama(path: Path, *, hf_compat: bool) -> tuple[LlamaConfig, object, CrossAttentionConfig,
                                                              dict[str, torch.Tensor]]:
    """Configs and the MMLlama state dict of an HF Llama 3.2 Vision directory (tensors stay memory-mapped)."""
    trunk, vision, cross = mllama_configs(read_json(path / HF_CONFIG), source=str(path / HF_CONFIG),
                                          hf_compat=hf_compat)
    by_file: dict[Path, list[str]] = {}
    for key, file in _hf_weight_files(path).items():
        by_file.setdefault(file, []).append(key)
    hf: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with _open_safetensors(file) as f:
            for key in keys:
                name = next((new + key[len(old):] for old, new in _HUB_TO_RUNTIME if key.startswith(old)), key)
                hf[name] = f.get_tensor(key)
    try:
        state = mmllama_state_from_hf(hf, trunk, vision, fusion_schedule(trunk.n_layers, cross.n_layers))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e}") from None
    return trunk, vision, cross, state
