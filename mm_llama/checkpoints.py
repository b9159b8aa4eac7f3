"""Reading and writing Llama 3 trunk checkpoints: Meta's and Hugging Face's formats.

- Meta: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank. Column-parallel weights (wq, wk, wv,
  w1, w3, output) were split on dim 0, row-parallel ones (wo, w2) on dim 1, `tok_embeddings` by vocabulary (dim 0,
  Llama 3's VocabParallelEmbedding); norms are replicated. Our parameter names *are* Meta's, so no key map is needed.
- Hugging Face: `config.json` + `model.safetensors` or `model-XXXXX-of-YYYYY.safetensors` with
  `model.safetensors.index.json`. Keys follow `HF_TO_META`; wq/wk are permuted for HF's rotate-half RoPE.

Conversion is data (STYLE rule 12): a key table plus one named transform (`permute_rope`/`unpermute_rope`).
Everything is loaded lazily (mmap for .pth, safe_open for safetensors), `torch.load` always with `weights_only=True`,
and the model is built on the meta device and filled with `load_state_dict(strict=True, assign=True)`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.hf_config import hf_config_to_llama, llama_to_hf_config
from mm_llama.llama import Llama, LlamaConfig

META_PARAMS = "params.json"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
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


def detect_format(path: str | Path) -> str:
    """"meta" (params.json), "hf" (config.json with safetensors) for a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected params.json + consolidated.NN.pth, "
                              "or config.json + *.safetensors)")
    if (path / META_PARAMS).is_file():
        return "meta"
    if (path / HF_CONFIG).is_file():
        return "hf"
    raise CheckpointError(f"{path}: neither {META_PARAMS} (Meta format) nor {HF_CONFIG} (Hugging Face format) found")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------- Meta format

def read_meta_config(path: Path) -> LlamaConfig:
    params = _read_json(path / META_PARAMS)
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


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], config: LlamaConfig,
                      names: list[str]) -> dict[str, torch.Tensor]:
    """Merge model-parallel shards into one state dict (Meta's layout rules, see the module docstring)."""
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
        elif key.endswith(_COLUMN_PARALLEL):
            merged[key] = torch.cat(parts, dim=0)
        elif key.endswith(_ROW_PARALLEL):
            merged[key] = torch.cat(parts, dim=1)
        else:
            merged[key] = first
    return merged


def split_meta_shards(state: dict[str, torch.Tensor], n: int, config: LlamaConfig) -> list[dict[str, torch.Tensor]]:
    """The inverse of `merge_meta_shards`: the n model-parallel shards Meta's code would save."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, value in state.items():
        if key.endswith(("attention.wk.weight", "attention.wv.weight")) and n > config.n_kv_heads:
            value = value.view(config.n_kv_heads, 1, -1, value.shape[1])
            value = value.expand(-1, n // config.n_kv_heads, -1, -1).reshape(-1, value.shape[-1])
        if key.endswith(_COLUMN_PARALLEL):
            parts = value.chunk(n, dim=0)
        elif key.endswith(_ROW_PARALLEL):
            parts = value.chunk(n, dim=1)
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


# ---------------------------------------------------------------------------------------------------- HF format

def _hf_templates() -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst)
            for src, dst in HF_TO_META.items()]


def _hf_weight_files(path: Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it (from the index when there is one)."""
    index = path / HF_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
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
    config = hf_config_to_llama(_read_json(path / HF_CONFIG), source=str(path / HF_CONFIG))
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
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    hf_state = {k: v.contiguous() for k, v in meta_to_hf_state(state, config).items()}
    dtype = next(iter(hf_state.values())).dtype
    (out / HF_CONFIG).write_text(json.dumps(llama_to_hf_config(config, dtype), indent=2) + "\n")
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


# ---------------------------------------------------------------------------------------------------- loading

def read_checkpoint(path: str | Path) -> tuple[str, LlamaConfig, dict[str, torch.Tensor]]:
    """(format, config, state dict with Meta names) of a checkpoint directory; tensors stay lazy where possible."""
    path = Path(path)
    fmt = detect_format(path)
    config, state = read_meta(path) if fmt == "meta" else read_hf(path)
    return fmt, config, state


def check_state_dict(state: dict[str, torch.Tensor], model: Llama, source: str) -> None:
    """Strict key and shape check, with a message that names the source and the first problems."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("output.weight")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source}: state dict does not match the config: missing {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                              f"{' ...' if len(unexpected) > 6 else ''}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, the config implies "
                                  f"{tuple(shape)}")


def check_tokenizer_vocab(path: Path, config: LlamaConfig) -> None:
    """A tokenizer.model shipped in the checkpoint directory must match the embedding table."""
    for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if candidate.is_file():
            from mm_llama.tokenizer import Tokenizer

            n_words = Tokenizer.from_file(candidate).n_words
            if n_words != config.vocab_size:
                raise CheckpointError(f"{path}: vocab_size {config.vocab_size} in the config differs from the "
                                      f"{n_words} tokens of {candidate}")
            return


def load_llama(path: str | Path, *, dtype: torch.dtype | None = torch.bfloat16,
               device: torch.device | str = "cpu") -> Llama:
    """Build a `Llama` from a Meta or HF checkpoint directory: meta-device construction, strict assign-load.

    Args:
        dtype: parameter dtype (None keeps the checkpoint's).
        device: where the weights go.
    """
    path = Path(path)
    fmt, config, state = read_checkpoint(path)
    check_tokenizer_vocab(path, config)
    with torch.device("meta"):
        model = Llama(config)
    check_state_dict(state, model, f"{path} ({fmt} format)")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
             for k, v in state.items()}
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_rope()
    return model


def save_llama(model: Llama, out: str | Path, *, fmt: str = "meta", n_shards: int = 1) -> None:
    """Write `model` as a Meta or HF checkpoint directory (atomically: a temporary directory, then a rename)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight")
    write_checkpoint(state, model.config, Path(out), fmt=fmt, n_shards=n_shards)


def write_checkpoint(state: dict[str, torch.Tensor], config: LlamaConfig, out: Path, *, fmt: str,
                     n_shards: int = 1, extra_files: tuple[Path, ...] = ()) -> None:
    if fmt not in ("meta", "hf"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; accepted: 'meta', 'hf'")
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        if fmt == "meta":
            write_meta(state, config, tmp, n_shards)
        else:
            write_hf(state, config, tmp)
        for extra in extra_files:
            shutil.copy2(extra, tmp / extra.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: str | None = None, n_shards: int = 1) -> str:
    """Convert a checkpoint directory Meta <-> HF without changing a single bit of the weights; returns the format
    written (by default the other one). A tokenizer.model next to the weights is copied along."""
    src, dst = Path(src), Path(dst)
    fmt, config, state = read_checkpoint(src)
    to = to or ("hf" if fmt == "meta" else "meta")
    extras = tuple(p for p in (src / "tokenizer.model", src / "original" / "tokenizer.model") if p.is_file())[:1]
    write_checkpoint(state, config, dst, fmt=to, n_shards=n_shards, extra_files=extras)
    return to
