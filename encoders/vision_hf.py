"""Hugging Face Mllama vision weights <-> our `VisionEncoder` (Meta's names).

Conversion is data (STYLE rule 12): `HF_TO_OURS` maps key templates ({} = block index) and `_TRANSFORMS` names the
two tensor transforms, both plain reshapes:

- the patch weight: HF's conv weight [D, 3, p, p] <-> our [D, 3*p*p];
- the three tile embeddings: HF stores each precomputed per aspect-ratio id, [R + 1, max_tiles * n * D] (row 0 =
  padding image), and so do we, as [R + 1, max_tiles, n, D]. Any table converts, including ones fine-tuned in
  transformers whose ratios disagree on shared tiles; HF -> ours -> HF and ours -> HF -> ours are both exact.

The HF state is a `MllamaVisionModel` state dict; pass `prefix="vision_model."` (hub files) or
`prefix="model.vision_model."` (transformers >= 4.52 runtime names) to read it out of a full model's state.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from encoders.image_transform import supported_aspect_ratios
from encoders.vision import VisionConfig
from mm_llama.errors import CheckpointError, ConfigError

# One block of either transformer: HF name -> ours.
_BLOCK = {
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
    "input_layernorm.weight": "ln_1.weight",
    "input_layernorm.bias": "ln_1.bias",
    "post_attention_layernorm.weight": "ln_2.weight",
    "post_attention_layernorm.bias": "ln_2.bias",
}

# HF key template -> our key template ({} = block index).
HF_TO_OURS: dict[str, str] = {
    "patch_embedding.weight": "conv1._linear.weight",
    "class_embedding": "class_embedding",
    "gated_positional_embedding.embedding": "positional_embedding",
    "gated_positional_embedding.gate": "gated_positional_embedding_gate",
    "gated_positional_embedding.tile_embedding.weight": "gated_positional_embedding",
    "pre_tile_positional_embedding.embedding.weight": "pre_tile_pos_embed.embedding",
    "pre_tile_positional_embedding.gate": "pre_tile_pos_embed.gate",
    "post_tile_positional_embedding.embedding.weight": "post_tile_pos_embed.embedding",
    "post_tile_positional_embedding.gate": "post_tile_pos_embed.gate",
    "layernorm_pre.weight": "ln_pre.weight",
    "layernorm_pre.bias": "ln_pre.bias",
    "layernorm_post.weight": "ln_post.weight",
    "layernorm_post.bias": "ln_post.bias",
    **{f"transformer.layers.{{}}.{k}": f"transformer.resblocks.{{}}.{v}" for k, v in _BLOCK.items()},
    **{f"global_transformer.layers.{{}}.{k}": f"global_transformer.resblocks.{{}}.{v}"
       for k, v in {**_BLOCK, "gate_attn": "gate_attn", "gate_ffn": "gate_ffn"}.items()},
}


def _patch_from_hf(w: torch.Tensor, config: VisionConfig, key: str) -> torch.Tensor:
    return w.reshape(config.width, -1)  # [D, 3, p, p] -> [D, 3*p*p], nn.Unfold's (channel, row, column) order


def _patch_to_hf(w: torch.Tensor, config: VisionConfig, key: str) -> torch.Tensor:
    return w.reshape(config.width, 3, config.patch_size, config.patch_size)


def _table_from_hf(table: torch.Tensor, config: VisionConfig, key: str) -> torch.Tensor:
    m, d = config.max_tiles, config.width
    if table.ndim != 2 or table.shape[1] % (m * d):
        raise CheckpointError(f"{key}: expected a per-aspect-ratio table [R + 1, {m} * n * {d}], "
                              f"got {list(table.shape)}")
    return table.reshape(table.shape[0], m, -1, d)  # [R+1, T*n*D] -> [R+1, T, n, D]


def _table_to_hf(table: torch.Tensor, config: VisionConfig, key: str) -> torch.Tensor:
    return table.flatten(1)  # [R+1, T, n, D] -> [R+1, T*n*D]


# Our key -> (HF -> ours, ours -> HF). Keys not listed are copied unchanged.
_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "conv1._linear.weight": (_patch_from_hf, _patch_to_hf),
    "gated_positional_embedding": (_table_from_hf, _table_to_hf),
    "pre_tile_pos_embed.embedding": (_table_from_hf, _table_to_hf),
    "post_tile_pos_embed.embedding": (_table_from_hf, _table_to_hf),
}


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


def _rename(key: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, dst in patterns:
        match = pattern.match(key)
        if match:
            return dst.format(*match.groups())
    return None


def _check_config(config: VisionConfig) -> None:
    if config.attn_bias:
        raise ConfigError("HF Mllama's vision attention has no biases; a VisionConfig with attn_bias=True "
                          "cannot be converted to or from it")


def vision_state_from_hf(hf_state: dict[str, torch.Tensor], config: VisionConfig, *, prefix: str = ""
                         ) -> dict[str, torch.Tensor]:
    """HF `MllamaVisionModel` state dict -> our `VisionEncoder` state dict.

    Args:
        hf_state: HF tensors; only keys starting with `prefix` are read (all of them when prefix is "").
        config: our config for the weights (e.g. from `vision_config_from_hf`).
        prefix: e.g. "vision_model." for a full Mllama checkpoint.

    Returns:
        Our state dict, loadable with `strict=True`.

    Raises:
        CheckpointError: an unknown key, or a tile table that is not [R + 1, max_tiles * n * width].
    """
    _check_config(config)
    patterns = _compile(HF_TO_OURS)
    out = {}
    for key, tensor in hf_state.items():
        if not key.startswith(prefix):
            continue
        ours = _rename(key[len(prefix):], patterns)
        if ours is None:
            raise CheckpointError(f"unknown HF vision key {key!r}")
        transform = _TRANSFORMS.get(ours)
        out[ours] = transform[0](tensor, config, key) if transform else tensor
    return out


def vision_state_to_hf(state: dict[str, torch.Tensor], config: VisionConfig, *, prefix: str = ""
                       ) -> dict[str, torch.Tensor]:
    """Our `VisionEncoder` state dict -> HF `MllamaVisionModel` state dict (keys get `prefix`)."""
    _check_config(config)
    patterns = _compile({v: k for k, v in HF_TO_OURS.items()})
    out = {}
    for key, tensor in state.items():
        hf = _rename(key, patterns)
        if hf is None:
            raise CheckpointError(f"our vision key {key!r} has no HF counterpart")
        transform = _TRANSFORMS.get(key)
        out[prefix + hf] = transform[1](tensor, config, key) if transform else tensor
    return out


# HF config keys that carry no architecture information for us.
_HF_CONFIG_IGNORED = {"initializer_range", "model_type", "transformers_version", "torch_dtype", "dtype",
                      "architectures", "_name_or_path", "return_dict", "output_hidden_states", "output_attentions",
                      "base_config_key", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
                      "tie_word_embeddings", "is_encoder_decoder", "_attn_implementation_autoset"}


def vision_config_from_hf(hf: dict, *, intermediate_mode: str = "input") -> VisionConfig:
    """Our `VisionConfig` from an HF `vision_config` dict (`MllamaVisionConfig.to_dict()` or config.json's).

    Args:
        hf: the dict.
        intermediate_mode: "input" (Meta's semantics, default) or "output" (what transformers >= 4.56 computes).

    Raises:
        ConfigError: a value our encoder cannot represent (activation, channels, aspect ratios, output dim).
    """
    size, patch = hf.get("image_size", 448), hf.get("patch_size", 14)
    size = size if isinstance(size, int) else (size[0] if size[0] == size[1] else None)
    patch = patch if isinstance(patch, int) else (patch[0] if patch[0] == patch[1] else None)
    if size is None or patch is None:
        raise ConfigError(f"HF vision config: only square image_size/patch_size are supported, got "
                          f"{hf.get('image_size')!r}, {hf.get('patch_size')!r}")
    config = VisionConfig(
        width=hf.get("hidden_size", 1280), n_layers=hf.get("num_hidden_layers", 32),
        n_global_layers=hf.get("num_global_layers", 8),
        n_heads=hf.get("attention_heads", hf.get("num_attention_heads", 16)),
        mlp_dim=hf.get("intermediate_size", 5120), patch_size=patch, tile_size=size,
        max_tiles=hf.get("max_num_tiles", 4),
        intermediate_layers=tuple(hf.get("intermediate_layers_indices") or (3, 7, 15, 23, 30)),
        norm_eps=hf.get("norm_eps", 1e-5), attn_bias=False, pad_to_multiple=8, intermediate_mode=intermediate_mode)
    problems = []
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only exact 'gelu')")
    if hf.get("num_channels", 3) != 3:
        problems.append(f"num_channels {hf['num_channels']} (only 3)")
    ratios = hf.get("supported_aspect_ratios")
    if ratios is not None and [tuple(r) for r in ratios] != supported_aspect_ratios(config.max_tiles):
        problems.append(f"supported_aspect_ratios {ratios} (only Meta's list for max_tiles={config.max_tiles})")
    if hf.get("vision_output_dim", config.output_dim) != config.output_dim:
        problems.append(f"vision_output_dim {hf['vision_output_dim']} != hidden_size * (1 + n_intermediate) "
                        f"= {config.output_dim}")
    if problems:
        raise ConfigError("HF vision config not supported: " + "; ".join(problems))
    return config
