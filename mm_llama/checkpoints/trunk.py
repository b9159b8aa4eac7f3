"""Llama 3 trunk checkpoints (`Llama`) in the three formats, and what every loader shares: format detection, the
strict state-dict check, atomic output directories, the tokenizer beside the weights."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mm_llama.checkpoints.fingerprint import SCHEME, trunk_fingerprint
from mm_llama.checkpoints.hf import HF_CONFIG, read_hf, write_hf
from mm_llama.checkpoints.meta import META_PARAMS, read_meta, write_meta
from mm_llama.checkpoints.ours import OURS_INDEX, TrunkReference, read_ours_trunk, write_ours
from mm_llama.devices import check_dtype, resolve_device
from mm_llama.errors import CheckpointError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.paths import checkpoint_path
from mm_llama.tokenizer import TOKENIZER_PLACES, find_tokenizer


def detect_format(path: str | Path) -> str:
    """"ours" (mm_llama.json), "meta" (params.json) or "hf" (config.json with safetensors) for a directory."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise CheckpointError(f"{path}: not a checkpoint directory ({what}); accepted: a Meta directory (params.json "
                              "+ consolidated.NN.pth), a Hugging Face one (config.json + *.safetensors) or an "
                              "mm-llama one (mm_llama.json), on this machine (nothing is downloaded from a model hub)")
    if (path / OURS_INDEX).is_file():
        return "ours"
    if (path / META_PARAMS).is_file():
        return "meta"
    if (path / HF_CONFIG).is_file():
        return "hf"
    raise CheckpointError(f"{path}: none of {META_PARAMS} (Meta format), {HF_CONFIG} (Hugging Face format) or "
                          f"{OURS_INDEX} (mm-llama format) found")


def read_checkpoint(path: str | Path) -> tuple[str, LlamaConfig, dict[str, torch.Tensor]]:
    """(format, config, state dict with Meta names) of a checkpoint directory; tensors stay lazy where possible."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "ours":
        trunk = read_ours_trunk(path)
        if isinstance(trunk, TrunkReference):  # an adapter checkpoint: the trunk lives in the checkpoint it refers to
            return read_referenced_trunk(trunk)[:3]
        return (fmt, *trunk)
    config, state = read_meta(path) if fmt == "meta" else read_hf(path)
    return fmt, config, state


def read_referenced_trunk(ref: TrunkReference) -> tuple[str, LlamaConfig, dict[str, torch.Tensor], Path]:
    """(format, config, state dict, directory) of the trunk checkpoint an adapter checkpoint refers to: the first of
    `ref.candidates` that exists and has the fingerprint the reference recorded (any that exists, for a reference
    without one). When none does, the error lists each place looked at, why it was not taken, and the ways out."""
    if ref.fingerprint is not None and ref.fingerprint.split(":")[0] != SCHEME:
        raise CheckpointError(f"{ref.index}: the trunk's fingerprint {ref.fingerprint!r} is of a scheme this version "
                              f"of mm-llama does not know (it computes {SCHEME!r}); upgrade mm-llama")
    tried = []
    for candidate in ref.candidates:
        if not candidate.is_dir():
            tried.append(f"{candidate} (missing)")
            continue
        try:
            fmt, config, state = read_checkpoint(candidate)
        except CheckpointError as e:
            tried.append(f"{candidate} (unreadable: {e})")
            continue
        if ref.fingerprint is None:
            return fmt, config, state, candidate
        found = trunk_fingerprint(state, tie_embeddings=config.tie_embeddings)
        if found == ref.fingerprint:
            return fmt, config, state, candidate
        tried.append(f"{candidate} (different weights: fingerprint {found})")
    expected = (f"the trunk checkpoint with weights fingerprint {ref.fingerprint}" if ref.fingerprint
                else "the trunk checkpoint it refers to (a reference written without a fingerprint)")
    raise CheckpointError(
        f"{ref.index}: cannot find {expected}; looked at {'; '.join(tried)}. Put that trunk checkpoint back at one of "
        "these paths (run directories moved together keep the relative path valid; a trunk run's keep_checkpoints "
        "rotation deletes its older steps), or write a self-contained copy that stores the trunk: "
        f"mm-llama export --checkpoint {ref.index.parent} --trunk TRUNK_DIR --out NEW_DIR")


def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str, *,
                     tied: str | None = None) -> None:
    """Strict key and shape check against `model`, with a message that names the source and the first problems.
    `tied`: the key of a tied output head, which checkpoints need not carry."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if tied is not None:
        expected.pop(tied)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source}: state dict does not match the config: missing {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                              f"{' ...' if len(unexpected) > 6 else ''}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, the config implies "
                                  f"{tuple(shape)}")


def tokenizer_candidates(path: Path) -> tuple[Path, ...]:
    """Where a checkpoint directory may keep its tokenizer.model (HF repositories put Meta's files under original/)."""
    return tuple(path / place for place in TOKENIZER_PLACES)


def check_tokenizer_vocab(path: Path, config: LlamaConfig) -> None:
    """A tokenizer.model shipped in the checkpoint directory must match the embedding table."""
    candidate = find_tokenizer(path)
    if candidate is not None:
        from mm_llama.tokenizer import Tokenizer

        n_words = Tokenizer.from_file(candidate).n_words
        if n_words != config.vocab_size:
            raise CheckpointError(f"{path}: vocab_size {config.vocab_size} in the config differs from the "
                                  f"{n_words} tokens of {candidate}")


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *, tied: bool,
                 prefix: str = "", dtype: torch.dtype | None, device: torch.device | str) -> None:
    """Check `state` strictly against `model` (built on the meta device), cast and move it, and assign it. With
    `tied` (the trunk's `tie_embeddings`) the output head under `prefix` shares the embedding; a checkpoint may carry
    it only as an equal copy."""
    head, embedding = f"{prefix}output.weight", f"{prefix}tok_embeddings.weight"
    state = dict(state)
    if tied and head in state:
        if not torch.equal(state[head], state[embedding]):
            raise CheckpointError(f"{source}: tie_embeddings is set but output.weight differs from tok_embeddings")
        del state[head]
    check_state_dict(state, model, source, tied=head if tied else None)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
             for k, v in state.items()}
    if tied:
        state[head] = state[embedding]
    model.load_state_dict(state, strict=True, assign=True)


def load_llama(path: str | Path, *, dtype: torch.dtype | None = torch.bfloat16,
               device: torch.device | str = "cpu") -> Llama:
    """Build a `Llama` from a Meta or HF checkpoint directory: meta-device construction, strict assign-load.

    Args:
        dtype: parameter dtype (None keeps the checkpoint's).
        device: where the weights go.
    """
    path, device = checkpoint_path(path), resolve_device(device)
    check_dtype(dtype)
    fmt, config, state = read_checkpoint(path)
    check_tokenizer_vocab(path, config)
    with torch.device("meta"):
        model = Llama(config)
    assign_state(model, state, f"{path} ({fmt} format)", tied=config.tie_embeddings, dtype=dtype, device=device)
    model.tie_weights()
    model.reset_rope()
    return model


def save_llama(model: Llama, out: str | Path, *, fmt: str = "meta", n_shards: int = 1) -> None:
    """Write `model` as a Meta or HF checkpoint directory (atomically: a temporary directory, then a rename)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight")
    if fmt not in ("meta", "hf", "ours"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; accepted: 'meta', 'hf', 'ours'")
    with atomic_directory(Path(out)) as tmp:
        write_trunk(state, model.config, tmp, fmt=fmt, n_shards=n_shards)


def write_trunk(state: dict[str, torch.Tensor], config: LlamaConfig, out: Path, *, fmt: str, n_shards: int = 1
                ) -> None:
    """Write a trunk's Meta-named state dict into the (existing, empty) directory `out` in format `fmt`."""
    if fmt == "meta":
        write_meta(state, config, out, n_shards)
    elif fmt == "hf":
        write_hf(state, config, out)
    else:
        write_ours(out, trunk={"config": config.to_dict()}, trunk_weights=state)


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out` (which must not exist), renamed to `out` when the block succeeds and
    removed when it fails: a checkpoint directory appears whole or not at all."""
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output directory")
    # The temporary directory sits beside the target so that the final rename stays on one filesystem.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


