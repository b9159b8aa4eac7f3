"""Meta's checkpoint format: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank.

Column-parallel weights (wq, wk, wv, w1, w3, output) were split on dim 0, row-parallel ones (wo, w2) on dim 1,
`tok_embeddings` by vocabulary (dim 0, Llama 3's VocabParallelEmbedding); norms are replicated. Our parameter names
*are* Meta's, so no key map is needed. `torch.load` always runs with `weights_only=True` and `mmap=True`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mm_llama.checkpoints.common import read_json
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.llama import LlamaConfig

META_PARAMS = "params.json"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")

# params.json keys -> LlamaConfig fields. Meta's reference also reads max_batch_size (a runtime limit, ignored
# here); our converter adds the rope_* and tie_embeddings fields so a round trip keeps them.
_META_KEYS = {f: f for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                             "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
                             "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                             "rope_original_context", "tie_embeddings")}
_META_IGNORED = {"max_batch_size"}
# Tensors some Meta releases carry that the model recomputes (Llama 2's precomputed RoPE table).
_META_IGNORED_TENSORS = {"rope.freqs"}
_META_VISION = {"vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers", "vision_model"}

# Model-parallel split dimension of each Meta parameter (by suffix); anything else is replicated.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def read_meta_config(path: Path) -> LlamaConfig:
    params = read_json(path / META_PARAMS)
    params = params.get("model", params)  # some exports nest everything under "model"
    vision = sorted(set(params) & _META_VISION)
    if vision and params.get("vision_chunk_size", 1) > 0:
        raise CheckpointError(f"{path / META_PARAMS}: has vision fields {vision}: this is a Llama 3.2 Vision "
                              "checkpoint; load it with MMLlama.from_pretrained")
    unknown = sorted(set(params) - set(_META_KEYS) - _META_IGNORED - _META_VISION)
    if unknown:
        raise ConfigError(f"{path / META_PARAMS}: unknown key(s) {unknown}; known keys: {sorted(_META_KEYS)}")
    values = {_META_KEYS[k]: v for k, v in params.items() if k in _META_KEYS}
    return LlamaConfig.from_dict(values, source=str(path / META_PARAMS))


def meta_shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth ... in rank order; a gap in the numbering is a missing shard."""
    found = {int(m.group(1)): p for p in path.glob("consolidated.*.pth") if (m := _SHARD_RE.search(p.name))}
    if not found:
        raise CheckpointError(f"{path}: no consolidated.NN.pth weight file next to {META_PARAMS}")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise CheckpointError(f"{path}: missing model-parallel shard(s) {missing}; found "
                              f"{[found[i].name for i in sorted(found)]}")
    return [found[i] for i in sorted(found)]


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a checkpoint must never run code. mmap: nothing is read until used.
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or pickled-code files
        raise CheckpointError(f"{file}: cannot load as a weights-only PyTorch file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], config: LlamaConfig, names: list[str], *,
                      column: tuple[str, ...] = _COLUMN_PARALLEL, row: tuple[str, ...] = _ROW_PARALLEL
                      ) -> dict[str, torch.Tensor]:
    """Merge model-parallel shards into one state dict (Meta's layout rules, see the module docstring).

    `column` / `row` are the key suffixes split on dim 0 / the last dim (Llama 3.2 Vision adds its own)."""
    if len(shards) == 1:
        return dict(shards[0])
    n = len(shards)
    for name, shard in zip(names[1:], shards[1:], strict=True):
        if shard.keys() != shards[0].keys():
            diff = sorted(shard.keys() ^ shards[0].keys())[:5]
            raise CheckpointError(f"{name}: keys differ from {names[0]} (e.g. {diff})")
    merged = {}
    for key, first in shards[0].items():
        parts = [s[key] for s in shards]
        if key.endswith(("attention.wk.weight", "attention.wv.weight")) and n > config.n_kv_heads:
            # With more ranks than kv heads, Meta repeats each kv head over n / n_kv_heads ranks: keep one copy.
            parts = parts[:: n // config.n_kv_heads]
        if key == "tok_embeddings.weight" and first.shape[0] * n != config.vocab_size:
            merged[key] = torch.cat(parts, dim=1)  # Llama 2's ParallelEmbedding split the model dim
        elif key.endswith(column):
            merged[key] = torch.cat(parts, dim=0)
        elif key.endswith(row):
            merged[key] = torch.cat(parts, dim=-1)
        else:
            for name, part in zip(names[1:], parts[1:], strict=True):
                if part.shape != first.shape:  # replicated: every rank holds the whole tensor
                    raise CheckpointError(f"{name}: {key} has shape {tuple(part.shape)}, {names[0]} "
                                          f"{tuple(first.shape)}; replicated tensors must agree")
            merged[key] = first
    return merged


def split_meta_shards(state: dict[str, torch.Tensor], n: int, config: LlamaConfig, *,
                      column: tuple[str, ...] = _COLUMN_PARALLEL, row: tuple[str, ...] = _ROW_PARALLEL
                      ) -> list[dict[str, torch.Tensor]]:
    """The inverse of `merge_meta_shards`: the n model-parallel shards Meta's code would save."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, value in state.items():
        if key.endswith(("attention.wk.weight", "attention.wv.weight")) and n > config.n_kv_heads:
            value = value.view(config.n_kv_heads, 1, -1, value.shape[1])
            value = value.expand(-1, n // config.n_kv_heads, -1, -1).reshape(-1, value.shape[-1])
        if key.endswith(column):
            parts = value.chunk(n, dim=0)
        elif key.endswith(row):
            parts = value.chunk(n, dim=-1)
        else:
            parts = [value] * n
        if len(parts) != n or any(p.shape != parts[0].shape for p in parts):
            raise CheckpointError(f"{key} of shape {tuple(value.shape)} cannot be split into {n} equal shards")
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def read_meta(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    config = read_meta_config(path)
    files = meta_shard_files(path)
    state = merge_meta_shards([_torch_load(f) for f in files], config, [str(f) for f in files])
    for key in _META_IGNORED_TENSORS & state.keys():
        del state[key]
    if config.tie_embeddings and "output.weight" in state:
        # Meta's code has an untied `output`, so its files for tied models may carry a copy: it must be a copy.
        if not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
            raise CheckpointError(f"{path}: tie_embeddings is set but output.weight differs from tok_embeddings")
        del state["output.weight"]
    return config, state


def write_meta(state: dict[str, torch.Tensor], config: LlamaConfig, out: Path, n_shards: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]  # Meta's reference model always has `output`
    (out / META_PARAMS).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    for i, shard in enumerate(split_meta_shards(state, n_shards, config)):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
