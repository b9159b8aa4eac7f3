"""Hugging Face's checkpoint format: `config.json` + `model.safetensors`, or `model-XXXXX-of-YYYYY.safetensors` with
`model.safetensors.index.json`.

Conversion is data (STYLE rule 12): the `HF_TO_META` key table plus one named transform, the rotary permutation of
wq/wk (HF uses a rotate-half RoPE layout, Meta interleaved pairs). Tensors are read lazily through `safe_open`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mm_llama.checkpoints.common import read_json
from mm_llama.checkpoints.hf_config import hf_config_to_llama, llama_to_hf_config
from mm_llama.errors import CheckpointError
from mm_llama.llama import LlamaConfig

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"

# Hugging Face key template -> Meta key template ({} = layer index), and the transform applied on the way in.
HF_TO_META: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# Buffers some HF versions saved; they carry no information we need.
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF: each head's rows go from interleaved pairs (x0, x1, x2, x3 ..) to halves (x0, x2 .. | x1 ..)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta: the inverse of `permute_rope`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_templates() -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst)
            for src, dst in HF_TO_META.items()]


def _hf_weight_files(path: Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it (from the index when there is one)."""
    index = path / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: lists shard file(s) {missing} that are not in {path}")
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: {HF_CONFIG} but no *.safetensors weights (and no {HF_INDEX})")
    if len(files) > 1:
        raise CheckpointError(f"{path}: several safetensors files {[f.name for f in files]} but no {HF_INDEX}")
    with _open_safetensors(files[0]) as f:
        return {k: files[0] for k in f.keys()}


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None


def read_hf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    config = hf_config_to_llama(read_json(path / HF_CONFIG), source=str(path / HF_CONFIG))
    templates = _hf_templates()
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in _hf_weight_files(path).items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with _open_safetensors(file) as f:
            for key in keys:
                if _HF_IGNORED.match(key):
                    continue
                matches = [(m, dst) for pattern, dst in templates if (m := pattern.match(key))]
                if not matches:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} for a Llama checkpoint")
                meta_key = matches[0][1].format(*matches[0][0].groups())
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from None
                if meta_key.endswith("attention.wq.weight"):
                    tensor = unpermute_rope(tensor, config.n_heads)
                elif meta_key.endswith("attention.wk.weight"):
                    tensor = unpermute_rope(tensor, config.n_kv_heads)
                state[meta_key] = tensor
    if config.tie_embeddings:
        state.pop("output.weight", None)  # some exports store the tied head anyway
    return config, state


def meta_to_hf_state(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Meta-named state dict -> HF-named one, wq/wk permuted for HF's rotate-half RoPE (other tensors shared)."""
    meta_to_hf = {dst: src for src, dst in HF_TO_META.items()}
    hf_state = {}
    for key, tensor in state.items():
        layer = re.findall(r"\.(\d+)\.", key)[:1]
        hf_key = meta_to_hf[re.sub(r"\.\d+\.", ".{}.", key, count=1)].format(*layer)
        if key.endswith("attention.wq.weight"):
            tensor = permute_rope(tensor, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute_rope(tensor, config.n_kv_heads)
        hf_state[hf_key] = tensor
    return hf_state


def write_hf(state: dict[str, torch.Tensor], config: LlamaConfig, out: Path,
             max_shard_bytes: int = 5 * 2**30) -> None:
    out.mkdir(parents=True, exist_ok=True)
    hf_state = {k: v.contiguous() for k, v in meta_to_hf_state(state, config).items()}
    dtype = next(iter(hf_state.values())).dtype
    (out / HF_CONFIG).write_text(json.dumps(llama_to_hf_config(config, dtype), indent=2) + "\n")
    save_hf_weights(hf_state, out, max_shard_bytes)


def save_hf_weights(hf_state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """HF-named contiguous tensors -> model.safetensors, or size-sharded files + model.safetensors.index.json."""
    from safetensors.torch import save_file

    # Shard by size, keeping HF's file naming so transformers' loader reads the result.
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes
    if len(groups) == 1:
        save_file(groups[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    (out / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
