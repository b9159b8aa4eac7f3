"""Checkpoint formats: Meta single file and model-parallel shards, HF single and sharded safetensors, conversion
round trips, and the errors a bad checkpoint raises."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_checkpoint
from mm_llama.checkpoints import (
    convert_checkpoint,
    load_llama,
    permute_rope,
    read_checkpoint,
    save_llama,
    unpermute_rope,
)
from mm_llama.errors import CheckpointError, ConfigError, MMLlamaError

TOKENS = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(3))


def logits_of(path):
    with torch.no_grad():
        return load_llama(path, dtype=torch.float32)(TOKENS)


def manual_meta_shards(state: dict, n: int) -> list[dict]:
    """Meta's model-parallel layout, written out independently of the library: column-parallel on dim 0,
    row-parallel on dim 1, embeddings by vocabulary, norms replicated."""
    shards = [{} for _ in range(n)]
    for key, value in state.items():
        if key.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight",
                         "tok_embeddings.weight")):
            parts = value.chunk(n, dim=0)
        elif key.endswith(("wo.weight", "w2.weight")):
            parts = value.chunk(n, dim=1)
        else:
            parts = [value] * n
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def write_meta_dir(path, params: dict, shards: list[dict]):
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")


def meta_params(config) -> dict:
    """A params.json as Meta ships it (no rope_* extras: Meta's code implies factor 8, low 1, high 4, 8192)."""
    return {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "multiple_of": config.multiple_of,
            "ffn_dim_multiplier": config.ffn_dim_multiplier, "norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta, "use_scaled_rope": True}


@pytest.fixture
def meta_reference(tmp_path):
    """A state dict with Meta names and Meta's default rope settings, plus its logits from the unsharded file."""
    hf_dir = tmp_path / "hf"
    make_hf_checkpoint(hf_dir, seed=4, original_context=8192)
    _, config, state = read_checkpoint(hf_dir)
    single = tmp_path / "meta1"
    write_meta_dir(single, meta_params(config), [state])
    return state, config, logits_of(single), logits_of(hf_dir)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_loads_strictly_with_same_logits(tmp_path, meta_reference, n_shards):
    state, config, single_logits, hf_logits = meta_reference
    path = tmp_path / f"meta{n_shards}x"
    write_meta_dir(path, meta_params(config), manual_meta_shards(state, n_shards))
    logits = logits_of(path)
    assert torch.equal(logits, single_logits)
    # Same weights through the HF path (which undoes the rotary permutation) give the same function.
    assert (logits - hf_logits).abs().max() <= 1e-5


def test_meta_shards_written_by_convert_match_meta_layout(tmp_path, meta_reference):
    state, config, single_logits, _ = meta_reference
    src = tmp_path / "meta1"
    convert_checkpoint(src, tmp_path / "meta2", to="meta", n_shards=2)
    for i, expected in enumerate(manual_meta_shards(state, 2)):
        got = torch.load(tmp_path / "meta2" / f"consolidated.{i:02d}.pth", weights_only=True)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(logits_of(tmp_path / "meta2"), single_logits)


def test_kv_heads_replicated_over_more_ranks_than_heads(tmp_path):
    """Meta repeats each kv head on n_ranks / n_kv_heads ranks (405B at MP 16): merging keeps one copy."""
    hf_dir = tmp_path / "hf"
    make_hf_checkpoint(hf_dir, seed=5, n_heads=8, n_kv_heads=2, original_context=8192)
    _, config, state = read_checkpoint(hf_dir)
    shards = manual_meta_shards(state, 4)
    for key in state:
        if key.endswith(("wk.weight", "wv.weight")):
            per_rank = state[key].chunk(2, dim=0)  # 2 kv heads over 4 ranks: head r // 2 on rank r
            for r in range(4):
                shards[r][key] = per_rank[r // 2].clone()
    write_meta_dir(tmp_path / "mp4", meta_params(config), shards)
    assert (logits_of(tmp_path / "mp4") - logits_of(hf_dir)).abs().max() <= 1e-5


def test_hf_to_meta_to_hf_round_trip_is_bit_identical(tmp_path, hf_checkpoint):
    hf_dir, hf_model = hf_checkpoint
    convert_checkpoint(hf_dir, tmp_path / "new" / "parent" / "meta")  # missing parents are created
    convert_checkpoint(tmp_path / "new" / "parent" / "meta", tmp_path / "hf2")
    assert not [p for p in (tmp_path / "new" / "parent").iterdir() if p.name.startswith(".")]  # no temp dir left
    original, again = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert original.keys() == again.keys()
    for key in original:
        assert original[key].dtype == again[key].dtype
        assert torch.equal(original[key], again[key]), key
    # And transformers itself reads what we wrote.
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, hf_model(TOKENS).logits)


def test_ours_format_round_trip(tmp_path, hf_checkpoint):
    hf_dir, hf_model = hf_checkpoint
    assert convert_checkpoint(hf_dir, tmp_path / "ours", to="ours") == "ours"
    assert (tmp_path / "ours" / "mm_llama.json").is_file()
    convert_checkpoint(tmp_path / "ours", tmp_path / "hf2", to="hf")
    original, again = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    with torch.no_grad():
        assert (logits_of(tmp_path / "ours") - hf_model(TOKENS).logits).abs().max() <= 1e-4


def test_rotary_permutation_is_inverted():
    w = torch.randn(64, 48)
    assert torch.equal(unpermute_rope(permute_rope(w, 4), 4), w)
    assert not torch.equal(permute_rope(w, 4), w)


def test_sharded_safetensors_with_index(tmp_path):
    hf_dir = tmp_path / "hf"
    hf = make_hf_checkpoint(hf_dir, seed=6)
    model = load_llama(hf_dir, dtype=torch.float32)
    out = tmp_path / "sharded"
    from mm_llama.checkpoints import write_hf

    state = {k: v for k, v in model.state_dict().items()}
    write_hf(state, model.config, out, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    with torch.no_grad():
        assert (load_llama(out, dtype=torch.float32)(TOKENS) - hf(TOKENS).logits).abs().max() <= 1e-4


def test_tied_model_round_trips_and_stays_tied(tmp_path):
    hf_dir = tmp_path / "hf"
    hf = make_hf_checkpoint(hf_dir, seed=7, tied=True)
    model = load_llama(hf_dir, dtype=torch.float32)
    assert model.output.weight is model.tok_embeddings.weight
    save_llama(model, tmp_path / "meta")
    meta_state = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(meta_state["output.weight"], meta_state["tok_embeddings.weight"])  # Meta's files keep both
    reloaded = load_llama(tmp_path / "meta", dtype=torch.float32)
    assert reloaded.output.weight is reloaded.tok_embeddings.weight
    with torch.no_grad():
        assert (reloaded(TOKENS) - hf(TOKENS).logits).abs().max() <= 1e-4


def test_dtype_and_frozen_load(hf_checkpoint):
    path, _ = hf_checkpoint
    model = load_llama(path)  # bf16 by default
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_inv_freq.dtype == torch.float32 and model.rope_inv_freq.device.type == "cpu"


# ----------------------------------------------------------------------------------------------- bad checkpoints

def expect_error(path, error_type, *fragments):
    with pytest.raises(error_type) as info:
        load_llama(path)
    assert isinstance(info.value, MMLlamaError)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_missing_shard_is_named(tmp_path, meta_reference):
    state, config, _, _ = meta_reference
    path = tmp_path / "gap"
    write_meta_dir(path, meta_params(config), manual_meta_shards(state, 3))
    (path / "consolidated.01.pth").unlink()
    expect_error(path, CheckpointError, "consolidated.01.pth", str(path))


def test_shape_mismatch_is_named(tmp_path, meta_reference):
    state, config, _, _ = meta_reference
    path = tmp_path / "shape"
    params = meta_params(config) | {"multiple_of": 64}  # a different FFN width than the weights have
    write_meta_dir(path, params, [state])
    expect_error(path, CheckpointError, "feed_forward.w1.weight", "shape", str(path))


def test_vocab_size_differs_from_tokenizer(tmp_path, hf_checkpoint):
    import base64

    path, _ = hf_checkpoint
    # A byte-level tokenizer: 256 ranks + 256 special tokens = 512 tokens, but the model has 300 embeddings.
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    (path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    expect_error(path, CheckpointError, "vocab_size 300", "512 tokens", "tokenizer.model")


def test_unknown_config_keys(tmp_path, meta_reference, hf_checkpoint):
    state, config, _, _ = meta_reference
    path = tmp_path / "unknown"
    write_meta_dir(path, meta_params(config) | {"moe_experts": 8}, [state])
    expect_error(path, ConfigError, "moe_experts", "params.json")
    hf_dir, _ = hf_checkpoint
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(cfg | {"sliding_window": 4096}))
    expect_error(hf_dir, ConfigError, "sliding_window", "config.json")


def test_unreadable_and_unsafe_weight_files(tmp_path, meta_reference):
    state, config, _, _ = meta_reference
    path = tmp_path / "empty"
    write_meta_dir(path, meta_params(config), [state])
    (path / "consolidated.00.pth").write_bytes(b"")
    expect_error(path, CheckpointError, "consolidated.00.pth")

    class Payload:  # a pickle that would run code on load: weights_only must refuse it
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "unsafe"
    write_meta_dir(path, meta_params(config), [state | {"extra": Payload()}])
    expect_error(path, CheckpointError, "weights-only", "consolidated.00.pth")


def test_hf_errors(tmp_path, hf_checkpoint):
    hf_dir, _ = hf_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    expect_error(broken, CheckpointError, "model.safetensors")
    (broken / "model.safetensors").unlink()
    expect_error(broken, CheckpointError, "no *.safetensors")
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    expect_error(broken, CheckpointError, "model-00001.safetensors")
    expect_error(tmp_path / "nowhere", CheckpointError, "nowhere", "not a checkpoint directory")
    (tmp_path / "plain").mkdir()
    expect_error(tmp_path / "plain", CheckpointError, "params.json", "config.json")
