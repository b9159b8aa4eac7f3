"""Llama 3.2 Vision checkpoints in Meta's format: `params.json` + `consolidated.NN.pth` (one file per model-parallel
rank) <-> `MMLlama`.

Our state-dict names are Meta's under other prefixes, so the key map is the prefix table `META_TO_OURS` (STYLE rule
12); `text_model.rope.freqs` (a precomputed table the model recomputes) is the one tensor allowed to be dropped.

params.json holds Meta's text fields (`checkpoints/meta.py`) plus `vision_chunk_size` (tile px),
`vision_max_num_chunks` (default 4) and `vision_num_cross_attention_layers` (or the nested form
`{"vision_model": {"cross_attention_adapter": {"num_layers": N}}}`); everything may be nested under `"model"`.
Meta hard-codes the ViT (`VisionConfig.preset("3.2-11B")` at the tile size); the tile size is also read off
`positional_embedding` (1025 rows -> 448 px, 1601 -> 560 px), and a params.json that disagrees is an error. Our
extension key `"mm_llama_vision": {VisionConfig fields}` describes another ViT (small test models); our writer emits it
only when the encoder differs from the 3.2 preset. Any other key is an error.

Meta keeps the ViT's three tile embeddings as [M, M, ...] grids; ours are per-aspect-ratio tables (which also hold
checkpoints fine-tuned in transformers), so the reader expands each grid (`grid_to_table`) and the writer folds the
tables back (`table_to_grid`), refusing tables that no grid gives. Meta's code places the cross-attention blocks by
its own rule: a model with an explicit other schedule (`CrossAttentionConfig.layers`) is refused too.

Model parallelism (Meta's `models/checkpoint.py`, with HF's converter for the two tensors Meta's helper misses):
trunk and cross-attention blocks as in `meta.py` (wq/wk/wv/w1/w3 dim 0, wo/w2 last dim); vision column-parallel
(dim 0): `attn.wq/wk/wv.weight`, `mlp.c_fc.weight/.bias`, `conv1._linear.weight`, `vision_projection.weight/.bias`,
`learnable_embedding.weight` (VocabParallelEmbedding(max(mp, 8))); row-parallel (last dim): `attn.wo.weight`,
`mlp.c_proj.weight`; everything else replicated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from adapters.cross_attention import CrossAttentionConfig, cross_attention_schedule, fusion_schedule
from encoders.vision import TILE_TABLE_KEYS
from mm_llama.checkpoints.common import read_json
from mm_llama.checkpoints.meta import (
    _COLUMN_PARALLEL,
    _META_IGNORED,
    _META_KEYS,
    _ROW_PARALLEL,
    META_PARAMS,
    _torch_load,
    merge_meta_shards,
    meta_shard_files,
    split_meta_shards,
)
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.llama import LlamaConfig
from mm_llama.model import MMConfig, stored_part_config

# Meta prefix -> our prefix; the first match wins, so the specific text_model.* entries come before the trunk's.
META_TO_OURS: list[tuple[str, str]] = [
    ("text_model.learnable_embedding.", "media.learnable_embedding."),
    ("text_model.cross_attention_layers.", "image_adapter.cross_attention_layers."),
    ("text_model.", "trunk."),
    ("vision_model.vision_encoder.", "vision."),
    ("vision_model.vision_projection.", "vision_projection."),
]
ALLOWED_EXTRA = {"text_model.rope.freqs"}
VISION_COLUMN = ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "conv1._linear.weight", "vision_projection.weight", "vision_projection.bias",
                 "learnable_embedding.weight")
VISION_ROW = ("attn.wo.weight", "mlp.c_proj.weight")
COLUMN, ROW = _COLUMN_PARALLEL + VISION_COLUMN, _ROW_PARALLEL + VISION_ROW

VISION_KEYS = {"vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers", "vision_model"}
OUR_VISION_KEY = "mm_llama_vision"  # our extension: a ViT other than Llama 3.2's
_POS_EMBED = "vision_model.vision_encoder.positional_embedding"
# Our names of the ViT's per-aspect-ratio tables (Meta: grids).
TILE_TABLES = {f"vision.{key}" for key in TILE_TABLE_KEYS}


def _params(path: Path) -> dict:
    params = read_json(path / META_PARAMS)
    return params.get("model", params)  # some exports nest everything under "model"


def is_meta_mllama(path: Path) -> bool:
    """A Meta directory whose params.json has vision fields (and a positive tile size where one is given)."""
    if not (path / META_PARAMS).is_file():
        return False
    params = _params(path)
    return bool(set(params) & (VISION_KEYS | {OUR_VISION_KEY})) and params.get("vision_chunk_size", 1) > 0


def to_ours(key: str) -> str | None:
    return next((new + key[len(old):] for old, new in META_TO_OURS if key.startswith(old)), None)


def to_meta(key: str) -> str:
    meta = next((old + key[len(new):] for old, new in META_TO_OURS if key.startswith(new)), None)
    if meta is None:
        raise CheckpointError(f"MMLlama tensor {key!r} has no place in Meta's Llama 3.2 Vision format")
    return meta


def _n_cross_layers(params: dict, source: str) -> int:
    values = {}
    if "vision_num_cross_attention_layers" in params:
        values["vision_num_cross_attention_layers"] = params["vision_num_cross_attention_layers"]
    if "vision_model" in params:
        nested = params["vision_model"]
        adapter = nested.get("cross_attention_adapter") if isinstance(nested, dict) else None
        if (not isinstance(nested, dict) or set(nested) != {"cross_attention_adapter"} or not isinstance(adapter, dict)
                or set(adapter) != {"num_layers"}):
            raise ConfigError(f"{source}: vision_model must be {{'cross_attention_adapter': {{'num_layers': N}}}}, "
                              f"got {nested!r}")
        values["vision_model.cross_attention_adapter.num_layers"] = adapter["num_layers"]
    if not values:
        raise ConfigError(f"{source}: no vision_num_cross_attention_layers (or vision_model.cross_attention_adapter."
                          "num_layers): the number of cross-attention layers is required")
    if len(set(values.values())) > 1:
        raise ConfigError(f"{source}: the cross-attention layer counts disagree: {values}")
    return next(iter(values.values()))


def read_meta_mllama_config(path: Path, *, positional_rows: int | None = None) -> MMConfig:
    """The `MMConfig` (Meta semantics) of a Meta Llama 3.2 Vision directory.

    Args:
        positional_rows: rows of the checkpoint's `positional_embedding`; the tile size they imply wins over
            params.json, which must then agree.
    """
    from encoders.vision import VisionConfig

    source = str(path / META_PARAMS)
    params = _params(path)
    unknown = sorted(set(params) - set(_META_KEYS) - _META_IGNORED - VISION_KEYS - {OUR_VISION_KEY})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: "
                          f"{sorted(set(_META_KEYS) | VISION_KEYS | {OUR_VISION_KEY})}")
    trunk = LlamaConfig.from_dict({_META_KEYS[k]: v for k, v in params.items() if k in _META_KEYS}, source=source)
    cross = CrossAttentionConfig(n_layers=_n_cross_layers(params, source))
    if OUR_VISION_KEY in params:
        if not isinstance(params[OUR_VISION_KEY], dict):
            raise ConfigError(f"{source}: {OUR_VISION_KEY} must be an object of VisionConfig fields")
        vision = VisionConfig.from_dict(params[OUR_VISION_KEY], source=f"{source} ({OUR_VISION_KEY})")
    else:
        vision = VisionConfig.preset("3.2-11B", max_tiles=params.get("vision_max_num_chunks", 4))
    tile = params.get("vision_chunk_size")
    if positional_rows is not None:
        side = math.isqrt(max(positional_rows - 1, 0))
        if side * side + 1 != positional_rows:
            raise CheckpointError(f"{path}: {_POS_EMBED} has {positional_rows} rows, not patches**2 + 1")
        derived = side * vision.patch_size
        if tile is not None and tile != derived:
            raise ConfigError(f"{source}: vision_chunk_size {tile} disagrees with the checkpoint, whose "
                              f"{_POS_EMBED} has {positional_rows} rows ({derived}-px tiles of {vision.patch_size}-px "
                              "patches)")
        tile = derived
    if tile is None:
        raise ConfigError(f"{source}: no vision_chunk_size and no {_POS_EMBED} to derive the tile size from")
    if OUR_VISION_KEY in params and tile != vision.tile_size:
        raise ConfigError(f"{source}: vision_chunk_size {tile} disagrees with {OUR_VISION_KEY}.tile_size "
                          f"{vision.tile_size}")
    if params.get("vision_max_num_chunks", vision.max_tiles) != vision.max_tiles:
        raise ConfigError(f"{source}: vision_max_num_chunks {params['vision_max_num_chunks']} disagrees with "
                          f"{OUR_VISION_KEY}.max_tiles {vision.max_tiles}")
    vision = VisionConfig.from_dict({**vision.to_dict(), "tile_size": tile}, source=source)
    return MMConfig(trunk=trunk, vision=vision, image_adapter=cross)


def read_meta_mllama(path: Path) -> tuple[MMConfig, dict[str, torch.Tensor]]:
    """Config and the MMLlama state dict (our names) of a Meta Llama 3.2 Vision directory; shards merged, tile
    grids expanded to per-aspect-ratio tables."""
    from encoders.vision_blocks import grid_to_table

    files = meta_shard_files(path)
    shards = [_torch_load(f) for f in files]
    rows = shards[0][_POS_EMBED].shape[0] if _POS_EMBED in shards[0] else None
    config = read_meta_mllama_config(path, positional_rows=rows)
    try:
        merged = merge_meta_shards(shards, config.trunk, [str(f) for f in files], column=COLUMN, row=ROW)
    except RuntimeError as e:  # torch.cat of shards whose shapes do not line up
        raise CheckpointError(f"{path}: shards {[f.name for f in files]} do not merge ({e})") from None
    state = {}
    for key, value in merged.items():
        if key in ALLOWED_EXTRA:
            continue
        ours = to_ours(key)
        if ours is None:
            raise CheckpointError(f"{files[0]}: unexpected tensor {key!r} for a Llama 3.2 Vision checkpoint")
        state[ours] = grid_to_table(value) if ours in TILE_TABLES else value
    return config, state


def meta_mllama_params(config: MMConfig) -> dict:
    """params.json for the configs: Meta's fields, plus `mm_llama_vision` when the ViT is not Llama 3.2's."""
    from encoders.vision import VisionConfig

    trunk, vision, cross = config.trunk, config.vision, config.image_adapter
    if cross_attention_schedule(trunk.n_layers, cross) != fusion_schedule(trunk.n_layers, cross.n_layers):
        raise CheckpointError(f"cross-attention blocks before trunk layers {list(cross.layers)}: Meta's format has "
                              f"no place for a schedule other than Llama 3.2's own "
                              f"({fusion_schedule(trunk.n_layers, cross.n_layers)}), which Meta's code always "
                              "applies; write the 'hf' or 'ours' format instead")
    params = trunk.to_dict() | {"vision_chunk_size": vision.tile_size, "vision_max_num_chunks": vision.max_tiles,
                                "vision_num_cross_attention_layers": cross.n_layers}
    ours = stored_part_config("vision", vision)  # without the load-time semantics fields
    preset = VisionConfig.preset("3.2-11B", tile_size=vision.tile_size, max_tiles=vision.max_tiles)
    if ours != stored_part_config("vision", preset):
        params[OUR_VISION_KEY] = ours | {"intermediate_layers": list(vision.intermediate_layers)}
    return params


def write_meta_mllama(state: dict[str, torch.Tensor], config: MMConfig, out: Path, n_shards: int = 1) -> None:
    """Write an MMLlama state dict (our names) as params.json + n model-parallel consolidated.NN.pth files."""
    from encoders.vision_blocks import table_to_grid

    params = meta_mllama_params(config)
    meta = {to_meta(k): table_to_grid(v, k) if k in TILE_TABLES else v for k, v in state.items()}
    if config.trunk.tie_embeddings:
        meta["text_model.output.weight"] = meta["text_model.tok_embeddings.weight"]
    (out / META_PARAMS).write_text(json.dumps(params, indent=2) + "\n")
    for i, shard in enumerate(split_meta_shards(meta, n_shards, config.trunk, column=COLUMN, row=ROW)):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
