"""Llama 3.2 Vision in Hugging Face's format (`config.json` with model_type "mllama" + safetensors) <-> `MMLlama`.

The text side is data (key tables plus the rotary permutation). HF keeps self- and cross-attention layers in one list
(40 for 11B): the cross block that precedes trunk layer `schedule[j]` sits at HF index `schedule[j] + j`, and trunk
layer i at `i + (blocks at or before i)`; any `cross_attention_layers` list is accepted, as transformers does (Llama
3.2's own follows `fusion_schedule`). Its `embed_tokens` is the frozen table and the 8 media rows stacked (128264
rows for 11B). The vision side is `encoders/vision_hf.py`.

Both the hub's tensor names (`language_model.model.*`, `vision_model.*`, `multi_modal_projector.*`,
`language_model.lm_head.weight`) and the runtime names of transformers >= 4.52 (`model.language_model.*`, …) load;
HF output uses the hub names, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from adapters.cross_attention import CrossAttentionConfig, cross_attention_schedule, fusion_schedule
from mm_llama.checkpoints.common import read_json
from mm_llama.checkpoints.hf import (
    HF_CONFIG,
    _hf_weight_files,
    _open_safetensors,
    permute_rope,
    save_hf_weights,
    unpermute_rope,
)
from mm_llama.checkpoints.hf_config import hf_config_to_llama, llama_to_hf_config
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.llama import LlamaConfig
from mm_llama.model import MMConfig

# Hub name prefix -> runtime name prefix (transformers' own `_checkpoint_conversion_mapping`, as data).
_HUB_TO_RUNTIME = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                   ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector.")]
# Text-config keys with no effect on the computation, or already read through the llama mapping.
_TEXT_ONLY_KEYS = {"cross_attention_layers", "dropout", "model_type", "use_cache", "initializer_range"}

SELF_LAYER = {  # HF suffix under layers.X. -> ours under trunk.layers.i.
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
CROSS_LAYER = {  # HF suffix under layers.X. -> ours under image_adapter.cross_attention_layers.j.
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "cross_attn_attn_gate": "gate_attn",
    "cross_attn_mlp_gate": "gate_ffwd",
}


def hf_layer_index(schedule: list[int], n_layers: int) -> tuple[dict[int, int], dict[int, int]]:
    """(trunk layer -> HF index, cross block -> HF index)."""
    blocks = {schedule[j] + j: j for j in range(len(schedule))}
    trunk = {i: i + sum(1 for s in schedule if s <= i) for i in range(n_layers)}
    return {i: x for i, x in trunk.items()}, {j: x for x, j in blocks.items()}


def text_state_from_hf(hf: dict[str, torch.Tensor], config: LlamaConfig, schedule: list[int],
                       prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """HF Mllama text weights (keys under `prefix`, e.g. "model." for MllamaForCausalLM, "model.language_model." at
    runtime in MllamaForConditionalGeneration) -> MMLlama's `trunk.*`, `media.*`, `image_adapter.*` keys."""
    trunk_at, block_at = hf_layer_index(schedule, config.n_layers)
    of_hf = {x: ("trunk.layers", i, SELF_LAYER) for i, x in trunk_at.items()}
    of_hf |= {x: ("image_adapter.cross_attention_layers", j, CROSS_LAYER) for j, x in block_at.items()}
    out: dict[str, torch.Tensor] = {}
    layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)$")
    for key, value in hf.items():
        if m := layer_re.match(key):
            x, suffix = int(m.group(1)), m.group(2)
            if x not in of_hf or suffix not in of_hf[x][2]:
                raise CheckpointError(f"unexpected Mllama tensor {key!r}")
            base, index, table = of_hf[x]
            if table is SELF_LAYER and suffix.endswith("q_proj.weight"):
                value = unpermute_rope(value, config.n_heads)
            elif table is SELF_LAYER and suffix.endswith("k_proj.weight"):
                value = unpermute_rope(value, config.n_kv_heads)
            out[f"{base}.{index}.{table[suffix]}"] = value
        elif key == f"{prefix}embed_tokens.weight":
            out["trunk.tok_embeddings.weight"] = value[: config.vocab_size]
            out["media.learnable_embedding.weight"] = value[config.vocab_size:]
        elif key == f"{prefix}norm.weight":
            out["trunk.norm.weight"] = value
        elif key == head:
            out["trunk.output.weight"] = value
        else:
            raise CheckpointError(f"unexpected Mllama tensor {key!r}")
    return out


def text_state_to_hf(state: dict[str, torch.Tensor], config: LlamaConfig, schedule: list[int],
                     prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """The inverse of `text_state_from_hf`."""
    trunk_at, block_at = hf_layer_index(schedule, config.n_layers)
    to_hf = {"trunk.layers": (trunk_at, {v: k for k, v in SELF_LAYER.items()}),
             "image_adapter.cross_attention_layers": (block_at, {v: k for k, v in CROSS_LAYER.items()})}
    out = {f"{prefix}embed_tokens.weight": torch.cat([state["trunk.tok_embeddings.weight"],
                                                      state["media.learnable_embedding.weight"]]),
           f"{prefix}norm.weight": state["trunk.norm.weight"], head: state["trunk.output.weight"]}
    layer_re = re.compile(r"^(trunk\.layers|image_adapter\.cross_attention_layers)\.(\d+)\.(.+)$")
    for key, value in state.items():
        if not (m := layer_re.match(key)):
            continue
        at, table = to_hf[m.group(1)]
        suffix = table[m.group(3)]
        if m.group(1) == "trunk.layers" and suffix.endswith("q_proj.weight"):
            value = permute_rope(value, config.n_heads)
        elif m.group(1) == "trunk.layers" and suffix.endswith("k_proj.weight"):
            value = permute_rope(value, config.n_kv_heads)
        out[f"{prefix}layers.{at[int(m.group(2))]}.{suffix}"] = value
    return out


def mmllama_state_from_hf(hf: dict[str, torch.Tensor], config: MMConfig) -> dict[str, torch.Tensor]:
    """A whole `MllamaForConditionalGeneration` state dict (runtime names, transformers >= 4.52) -> MMLlama's."""
    from encoders.vision_hf import vision_state_from_hf

    vision = vision_state_from_hf(hf, config.vision, prefix="model.vision_model.")
    out = {f"vision.{k}": v for k, v in vision.items()}
    out["vision_projection.weight"] = hf["model.multi_modal_projector.weight"]
    out["vision_projection.bias"] = hf["model.multi_modal_projector.bias"]
    text = {k: v for k, v in hf.items() if k.startswith("model.language_model.") or k == "lm_head.weight"}
    out |= text_state_from_hf(text, config.trunk, _schedule(config), prefix="model.language_model.")
    known = set(text) | {k for k in hf if k.startswith(("model.vision_model.", "model.multi_modal_projector."))}
    if unknown := sorted(set(hf) - known):
        raise CheckpointError(f"unexpected Mllama tensors {unknown[:5]}")
    return out


def _schedule(config: MMConfig) -> list[int]:
    return cross_attention_schedule(config.trunk.n_layers, config.image_adapter)


def hub_to_runtime(key: str) -> str:
    """A hub tensor name -> the name of the same tensor in transformers >= 4.52's module tree."""
    return next((new + key[len(old):] for old, new in _HUB_TO_RUNTIME if key.startswith(old)), key)


def adapter_config_from_hf(cross: list, n_total: int, *, source: str) -> CrossAttentionConfig:
    """HF's `cross_attention_layers` (indices into its list of `n_total` self- and cross-attention layers) -> our
    schedule: block j precedes trunk layer `cross[j] - j`. Llama 3.2's own spacing stays implicit (layers=None)."""
    if not cross or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_total for i in cross):
        raise ConfigError(f"{source}: text_config.cross_attention_layers must be a non-empty list of layer indices "
                          f"in [0, {n_total}), got {cross!r}")
    cross = sorted(set(cross))  # transformers only asks "is layer i in the list"
    n_self = n_total - len(cross)
    layers = [c - j for j, c in enumerate(cross)]
    if n_self >= len(cross) and layers == fusion_schedule(n_self, len(cross)):
        return CrossAttentionConfig(n_layers=len(cross))
    return CrossAttentionConfig(n_layers=len(cross), layers=tuple(layers))


def mllama_config_from_hf(config: dict, *, source: str) -> MMConfig:
    """`MMConfig` (Meta semantics) of an HF Mllama config.json."""
    from encoders.vision_hf import vision_config_from_hf

    text = dict(config.get("text_config") or {})
    n_total = text.get("num_hidden_layers")
    if not isinstance(n_total, int):
        raise ConfigError(f"{source}: text_config.num_hidden_layers must be an integer, got {n_total!r}")
    adapter = adapter_config_from_hf(list(text.get("cross_attention_layers") or []), n_total, source=source)
    llama = {k: v for k, v in text.items() if k not in _TEXT_ONLY_KEYS}
    llama |= {"model_type": "llama", "num_hidden_layers": n_total - adapter.n_layers}
    trunk = hf_config_to_llama(llama, source=f"{source} (text_config)")
    if config.get("image_token_index", trunk.vocab_size) != trunk.vocab_size:
        raise ConfigError(f"{source}: image_token_index {config['image_token_index']} is not the first row above "
                          f"the vocabulary ({trunk.vocab_size})")
    vision = vision_config_from_hf(config.get("vision_config") or {})
    return MMConfig(trunk=trunk, vision=vision, image_adapter=adapter)


def read_hf_mllama(path: Path) -> tuple[MMConfig, dict[str, torch.Tensor]]:
    """Config and the MMLlama state dict of an HF Llama 3.2 Vision directory (tensors stay memory-mapped)."""
    config = mllama_config_from_hf(read_json(path / HF_CONFIG), source=str(path / HF_CONFIG))
    by_file: dict[Path, list[str]] = {}
    for key, file in _hf_weight_files(path).items():
        by_file.setdefault(file, []).append(key)
    hf: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with _open_safetensors(file) as f:
            for key in keys:
                hf[hub_to_runtime(key)] = f.get_tensor(key)
    try:
        state = mmllama_state_from_hf(hf, config)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e}") from None
    return config, state


def hf_vision_config(vision) -> dict:
    """HF `vision_config` (MllamaVisionConfig) for our VisionConfig; the inverse of `vision_config_from_hf`."""
    from encoders.image_transform import supported_aspect_ratios

    if vision.attn_bias or vision.pad_to_multiple != 8:
        raise ConfigError(f"HF Mllama's encoder has no attention biases and pads tiles to a multiple of 8; "
                          f"VisionConfig(attn_bias={vision.attn_bias}, pad_to_multiple={vision.pad_to_multiple}) "
                          "cannot be written in its format")
    return {"model_type": "mllama_vision_model", "hidden_size": vision.width, "hidden_act": "gelu",
            "num_hidden_layers": vision.n_layers, "num_global_layers": vision.n_global_layers,
            "attention_heads": vision.n_heads, "num_channels": 3, "intermediate_size": vision.mlp_dim,
            "vision_output_dim": vision.output_dim, "image_size": vision.tile_size, "patch_size": vision.patch_size,
            "norm_eps": vision.norm_eps, "max_num_tiles": vision.max_tiles,
            "intermediate_layers_indices": list(vision.intermediate_layers),
            "supported_aspect_ratios": [list(r) for r in supported_aspect_ratios(vision.max_tiles)]}


def hf_mllama_config(config: MMConfig, dtype: torch.dtype) -> dict:
    """config.json that `transformers.MllamaForConditionalGeneration.from_pretrained` loads (4.x and 5.x)."""
    trunk, adapter = config.trunk, config.image_adapter
    text = llama_to_hf_config(trunk, dtype)
    for key in ("architectures", "head_dim", "attention_bias", "mlp_bias", "torch_dtype"):
        text.pop(key)
    text |= {"model_type": "mllama_text_model", "num_hidden_layers": trunk.n_layers + adapter.n_layers,
             "cross_attention_layers": [layer + j for j, layer in enumerate(_schedule(config))],
             # HF's converter writes Llama 3's <|finetune_right_pad_id|>; a smaller vocabulary has no such row.
             "pad_token_id": 128004 if trunk.vocab_size > 128004 else None}
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": trunk.vocab_size, "torch_dtype": str(dtype).removeprefix("torch."),
            "text_config": text, "vision_config": hf_vision_config(config.vision)}


def mmllama_state_to_hf(state: dict[str, torch.Tensor], config: MMConfig) -> dict[str, torch.Tensor]:
    """MMLlama state dict -> HF Mllama tensors under the hub names (what transformers' save_pretrained writes)."""
    from encoders.vision_hf import vision_state_to_hf

    vision_state = {k.removeprefix("vision."): v for k, v in state.items() if k.startswith("vision.")}
    out = vision_state_to_hf(vision_state, config.vision, prefix="vision_model.")
    out["multi_modal_projector.weight"] = state["vision_projection.weight"]
    out["multi_modal_projector.bias"] = state["vision_projection.bias"]
    text = dict(state)
    if config.trunk.tie_embeddings:
        text.setdefault("trunk.output.weight", state["trunk.tok_embeddings.weight"])
    out |= text_state_to_hf(text, config.trunk, _schedule(config), prefix="language_model.model.",
                            head="language_model.lm_head.weight")
    return out


def write_hf_mllama(state: dict[str, torch.Tensor], config: MMConfig, out: Path) -> None:
    hf = {k: v.contiguous() for k, v in mmllama_state_to_hf(state, config).items()}
    dtype = hf["multi_modal_projector.weight"].dtype
    (out / HF_CONFIG).write_text(json.dumps(hf_mllama_config(config, dtype), indent=2) + "\n")
    save_hf_weights(hf, out)
