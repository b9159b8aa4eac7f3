"""Llama 3.2 Vision checkpoints <-> `MMLlama`: Hugging Face's format read here (`config.json` with model_type "mllama"
+ safetensors), Meta's in `mllama_meta.py`, ours in `ours.py`; plus the format-independent loader
(`load_mmllama`, behind `MMLlama.from_pretrained`), writer (`save_mmllama`, `write_mmllama`) and `convert_mmllama`.

Both the hub's tensor names (`language_model.model.*`, `vision_model.*`, `multi_modal_projector.*`,
`language_model.lm_head.weight`) and the runtime names of transformers >= 4.52 (`model.language_model.*`, …) load;
HF output uses the hub names, as `save_pretrained` does.
"""

from __future__ import annotations

import shutil
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


def hub_to_runtime(key: str) -> str:
    """A hub tensor name -> the name of the same tensor in transformers >= 4.52's module tree."""
    return next((new + key[len(old):] for old, new in _HUB_TO_RUNTIME if key.startswith(old)), key)


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
                hf[hub_to_runtime(key)] = f.get_tensor(key)
    try:
        state = mmllama_state_from_hf(hf, trunk, vision, fusion_schedule(trunk.n_layers, cross.n_layers))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e}") from None
    return trunk, vision, cross, state


# --- Every Llama 3.2 Vision format: detection, strict loading, writing, conversion --------------------------------

MLLAMA_FORMATS = ("meta", "hf", "ours")


def mllama_format(path: Path) -> str | None:
    """"hf" (config.json, model_type mllama), "meta" (params.json with vision fields), "ours" (mm_llama.json with a
    vision part) or None for anything else."""
    from mm_llama.checkpoints.mllama_meta import is_meta_mllama
    from mm_llama.checkpoints.ours import has_part

    path = Path(path)
    if not path.is_dir():
        return None
    if has_part(path, "vision"):
        return "ours"
    if is_meta_mllama(path):
        return "meta"
    if is_hf_mllama(path):
        return "hf"
    return None


def read_ours_mllama(path: Path, *, hf_compat: bool) -> tuple[LlamaConfig, object, CrossAttentionConfig,
                                                                dict[str, torch.Tensor]]:
    """Configs and the MMLlama state dict of an mm-llama directory with `vision` and `image_adapter` parts."""
    from encoders.vision import VisionConfig
    from mm_llama.checkpoints import read_checkpoint
    from mm_llama.checkpoints.ours import OURS_INDEX, read_ours_parts, read_ours_trunk

    index = path / OURS_INDEX
    trunk_entry = read_ours_trunk(path)
    trunk, trunk_state = read_checkpoint(trunk_entry)[1:] if isinstance(trunk_entry, Path) else trunk_entry
    parts = read_ours_parts(path)
    missing = sorted({"vision", "image_adapter"} - parts.keys())
    if missing:
        raise CheckpointError(f"{index}: a Llama 3.2 Vision checkpoint needs the parts 'vision' and 'image_adapter'; "
                              f"missing {missing}")
    vision_dict, vision_state = parts["vision"]
    vision = VisionConfig.from_dict({**vision_dict, "intermediate_mode": "output" if hf_compat else "input"},
                                    source=f"{index} (parts.vision.config)")
    cross_dict, cross_state = parts["image_adapter"]
    unknown = sorted(set(cross_dict) - {"n_layers", "mask_attention_rows"})
    if unknown:
        raise ConfigError(f"{index}: unknown parts.image_adapter.config key(s) {unknown}; known: ['n_layers']")
    cross = CrossAttentionConfig(n_layers=cross_dict.get("n_layers", 8), mask_attention_rows=not hf_compat)
    state = {f"trunk.{k}": v for k, v in trunk_state.items()}
    for name, part in (("vision", vision_state), ("image_adapter", cross_state)):
        if overlap := sorted(state.keys() & part.keys()):
            raise CheckpointError(f"{index}: part {name!r} repeats tensors {overlap[:5]}")
        state |= part
    return trunk, vision, cross, state


def read_mmllama(path: Path, *, hf_compat: bool = False):
    """(format, trunk config, vision config, cross-attention config, MMLlama state dict) of a Llama 3.2 Vision
    directory in any of the three formats; tensors stay memory-mapped where the format allows."""
    from mm_llama.checkpoints.mllama_meta import read_meta_mllama

    path = Path(path)
    fmt = mllama_format(path)
    if fmt is None:
        raise CheckpointError(f"{path}: not a Llama 3.2 Vision checkpoint directory; accepted: Hugging Face "
                              "(config.json with model_type 'mllama'), Meta (params.json with vision_* fields + "
                              "consolidated.NN.pth), mm-llama (mm_llama.json with a 'vision' part)")
    reader = {"hf": read_hf_mllama, "meta": read_meta_mllama, "ours": read_ours_mllama}[fmt]
    return (fmt, *reader(path, hf_compat=hf_compat))


def load_mmllama(path, *, hf_compat: bool = False, dtype: torch.dtype | None = torch.bfloat16,
                 device: torch.device | str = "cpu"):
    """`MMLlama.from_pretrained`: meta-device construction, strict assign-load, tokenizer.model if present."""
    from encoders.vision import VisionEncoder
    from mm_llama.checkpoints import check_state_dict, tokenizer_candidates
    from mm_llama.llama import Llama
    from mm_llama.model import MMLlama
    from mm_llama.tokenizer import Tokenizer

    path = Path(path)
    fmt, trunk_config, vision_config, cross_config, state = read_mmllama(path, hf_compat=hf_compat)
    with torch.device("meta"):
        model = MMLlama.with_image_adapter(Llama(trunk_config), cross_config, vision=VisionEncoder(vision_config))
    if trunk_config.tie_embeddings and "trunk.output.weight" in state:
        if not torch.equal(state["trunk.output.weight"], state["trunk.tok_embeddings.weight"]):
            raise CheckpointError(f"{path}: tie_embeddings is set but output.weight differs from tok_embeddings")
        del state["trunk.output.weight"]
    check_state_dict(state, model, f"{path} ({fmt} format)",
                     tied="trunk.output.weight" if trunk_config.tie_embeddings else None)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
             for k, v in state.items()}
    if trunk_config.tie_embeddings:
        state["trunk.output.weight"] = state["trunk.tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.trunk.tie_weights()
    model.trunk.reset_rope()
    model.vision.reset_buffers()
    model.hf_padding_images = hf_compat
    for candidate in tokenizer_candidates(path):
        if candidate.is_file():
            model.tokenizer = Tokenizer.from_file(candidate)
            break
    return model.eval()


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


def hf_mllama_config(trunk: LlamaConfig, vision, cross: CrossAttentionConfig, dtype: torch.dtype) -> dict:
    """config.json that `transformers.MllamaForConditionalGeneration.from_pretrained` loads (4.x and 5.x)."""
    from mm_llama.checkpoints.hf_config import llama_to_hf_config

    text = llama_to_hf_config(trunk, dtype)
    for key in ("architectures", "head_dim", "attention_bias", "mlp_bias", "torch_dtype"):
        text.pop(key)
    schedule = fusion_schedule(trunk.n_layers, cross.n_layers)
    text |= {"model_type": "mllama_text_model", "num_hidden_layers": trunk.n_layers + cross.n_layers,
             "cross_attention_layers": [layer + j for j, layer in enumerate(schedule)],
             # HF's converter writes Llama 3's <|finetune_right_pad_id|>; a smaller vocabulary has no such row.
             "pad_token_id": 128004 if trunk.vocab_size > 128004 else None}
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": trunk.vocab_size, "torch_dtype": str(dtype).removeprefix("torch."),
            "text_config": text, "vision_config": hf_vision_config(vision)}


def mmllama_state_to_hf(state: dict[str, torch.Tensor], trunk: LlamaConfig, vision, cross: CrossAttentionConfig
                        ) -> dict[str, torch.Tensor]:
    """MMLlama state dict -> HF Mllama tensors under the hub names (what transformers' save_pretrained writes)."""
    from encoders.vision_hf import vision_state_to_hf
    from mm_llama.checkpoints.mllama_hf import text_state_to_hf

    vision_state = {k.removeprefix("vision."): v for k, v in state.items() if k.startswith("vision.")}
    out = vision_state_to_hf(vision_state, vision, prefix="vision_model.")
    out["multi_modal_projector.weight"] = state["vision_projection.weight"]
    out["multi_modal_projector.bias"] = state["vision_projection.bias"]
    text = dict(state)
    if trunk.tie_embeddings:
        text.setdefault("trunk.output.weight", state["trunk.tok_embeddings.weight"])
    out |= text_state_to_hf(text, trunk, fusion_schedule(trunk.n_layers, cross.n_layers),
                            prefix="language_model.model.", head="language_model.lm_head.weight")
    return out


def write_hf_mllama(state, trunk: LlamaConfig, vision, cross: CrossAttentionConfig, out: Path) -> None:
    import json

    from mm_llama.checkpoints.hf import save_hf_weights

    hf = {k: v.contiguous() for k, v in mmllama_state_to_hf(state, trunk, vision, cross).items()}
    dtype = hf["multi_modal_projector.weight"].dtype
    (out / HF_CONFIG).write_text(json.dumps(hf_mllama_config(trunk, vision, cross, dtype), indent=2) + "\n")
    save_hf_weights(hf, out)


def mllama_parts(state: dict[str, torch.Tensor], vision, cross: CrossAttentionConfig) -> dict:
    """The `vision` and `image_adapter` parts of the mm-llama format for the non-trunk tensors of an MMLlama
    state dict (full names); shared by `save_mmllama` and the image-adapter training stage."""
    vision_dict = {k: v for k, v in vision.to_dict().items() if k != "intermediate_mode"}
    vision_part = {k: v for k, v in state.items() if k.startswith(("vision.", "vision_projection."))}
    adapter_part = {k: v for k, v in state.items() if k.startswith(("media.", "image_adapter."))}
    if rest := sorted(state.keys() - vision_part.keys() - adapter_part.keys()):
        raise CheckpointError(f"MMLlama tensors {rest[:5]} belong to no part of the mm-llama format")
    return {"vision": (vision_dict, vision_part), "image_adapter": ({"n_layers": cross.n_layers}, adapter_part)}


def write_ours_mllama(state, trunk: LlamaConfig, vision, cross: CrossAttentionConfig, out: Path) -> None:
    from mm_llama.checkpoints.ours import write_ours

    trunk_state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    rest = {k: v for k, v in state.items() if not k.startswith("trunk.")}
    write_ours(out, trunk={"config": trunk.to_dict()}, trunk_weights=trunk_state,
               parts=mllama_parts(rest, vision, cross))


def write_mmllama(state: dict[str, torch.Tensor], trunk: LlamaConfig, vision, cross: CrossAttentionConfig,
                  out: Path, *, fmt: str, n_shards: int = 1, extra_files: tuple[Path, ...] = ()) -> None:
    """Write an MMLlama state dict as a Meta, HF or mm-llama directory: all or nothing (temp dir + rename)."""
    from mm_llama.checkpoints import atomic_directory
    from mm_llama.checkpoints.mllama_meta import write_meta_mllama

    if fmt not in MLLAMA_FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; accepted: 'meta', 'hf', 'ours'")
    if fmt != "meta" and n_shards != 1:
        raise CheckpointError(f"n_shards={n_shards}: model-parallel shards exist only in Meta's format")
    with atomic_directory(Path(out)) as tmp:
        if fmt == "meta":
            write_meta_mllama(state, trunk, vision, cross, tmp, n_shards)
        elif fmt == "hf":
            write_hf_mllama(state, trunk, vision, cross, tmp)
        else:
            write_ours_mllama(state, trunk, vision, cross, tmp)
        for extra in extra_files:
            shutil.copy2(extra, tmp / extra.name)


def save_mmllama(model, out: str | Path, *, fmt: str = "meta", n_shards: int = 1) -> None:
    """Write an `MMLlama` with an image encoder and adapter as a Meta ("meta", `n_shards` model-parallel files),
    Hugging Face ("hf") or mm-llama ("ours") directory, atomically. `out` must not exist."""
    if model.vision is None or model.image_adapter is None:
        raise CheckpointError("save_mmllama writes Llama 3.2 Vision models: this MMLlama has no image encoder or "
                              "no image adapter")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.trunk.config.tie_embeddings:
        state.pop("trunk.output.weight")
    write_mmllama(state, model.trunk.config, model.vision.config, model.image_adapter.config, Path(out), fmt=fmt,
                  n_shards=n_shards)


def convert_mmllama(src: str | Path, dst: str | Path, *, to: str | None = None, n_shards: int = 1) -> str:
    """Convert a Llama 3.2 Vision directory between the three formats without changing a bit of the weights
    (HF tile tables must be precomputed grids, as HF's converter writes them); returns the format written (by
    default Meta -> HF, anything else -> Meta). A tokenizer.model next to the weights is copied along."""
    from mm_llama.checkpoints import tokenizer_candidates

    src = Path(src)
    fmt, trunk, vision, cross, state = read_mmllama(src)
    to = to or ("hf" if fmt == "meta" else "meta")
    extras = tuple(p for p in tokenizer_candidates(src) if p.is_file())[:1]
    write_mmllama(state, trunk, vision, cross, Path(dst), fmt=to, n_shards=n_shards, extra_files=extras)
    return to
