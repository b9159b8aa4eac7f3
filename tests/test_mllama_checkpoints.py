"""Llama 3.2 Vision checkpoints in the three formats (Meta, Hugging Face, ours), from the tiny random Mllama of
test_mllama_parity: strict loads with identical logits, bit-exact round trips, transformers reading our HF output,
Meta's model-parallel sharding re-derived here independently, and clear errors for broken directories."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_mllama_parity import hf_logits, inputs, our_logits, tiny_mllama

from mm_llama.checkpoints import convert_checkpoint, save_mmllama
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.model import MMLlama

F32 = torch.float32


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(HF directory, tokens, images, transformers' logits, our Meta-semantics logits from the HF directory)."""
    hf, _ = tiny_mllama()
    path = tmp_path_factory.mktemp("mllama") / "hub"
    hf.save_pretrained(path)
    tokens, batch = inputs()
    meta_semantics = our_logits(MMLlama.from_pretrained(path, dtype=F32), tokens, batch)
    return path, tokens, batch, hf_logits(hf, tokens, batch), meta_semantics


def meta_split(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's model-parallel layout, written out independently of the library (vision.md §2.8, HF's converter for
    vision_projection.bias and learnable_embedding)."""
    dim0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
            "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight", "attn.wq.weight", "attn.wk.weight",
            "attn.wv.weight", "mlp.c_fc.weight", "mlp.c_fc.bias", "conv1._linear.weight",
            "vision_projection.weight", "vision_projection.bias", "learnable_embedding.weight")
    last = ("attention.wo.weight", "feed_forward.w2.weight", "attn.wo.weight", "mlp.c_proj.weight")
    shards = [{} for _ in range(n)]
    for key, value in state.items():
        parts = value.chunk(n, 0) if key.endswith(dim0) else value.chunk(n, -1) if key.endswith(last) else [value] * n
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def test_meta_format_one_and_two_shards_load_to_identical_logits(hub, tmp_path):
    path, tokens, batch, hf_expected, expected = hub
    save_mmllama(MMLlama.from_pretrained(path, dtype=F32), tmp_path / "meta1", fmt="meta")
    params = json.loads((tmp_path / "meta1" / "params.json").read_text())
    assert params["vision_chunk_size"] == 28 and params["vision_num_cross_attention_layers"] == 2
    assert "mm_llama_vision" in params  # a tiny ViT, not Llama 3.2's
    assert torch.equal(our_logits(MMLlama.from_pretrained(tmp_path / "meta1", dtype=F32), tokens, batch), expected)

    whole = torch.load(tmp_path / "meta1" / "consolidated.00.pth", weights_only=True, mmap=True)
    assert "text_model.learnable_embedding.weight" in whole and "vision_model.vision_projection.bias" in whole
    two = tmp_path / "meta2"
    two.mkdir()
    shutil.copy(tmp_path / "meta1" / "params.json", two)
    for i, shard in enumerate(meta_split(whole, 2)):
        assert shard["text_model.learnable_embedding.weight"].shape[0] == 4
        assert shard["vision_model.vision_projection.bias"].shape[0] == 32
        torch.save(shard, two / f"consolidated.{i:02d}.pth")
    assert torch.equal(our_logits(MMLlama.from_pretrained(two, dtype=F32), tokens, batch), expected)
    compat = MMLlama.from_pretrained(two, hf_compat=True, dtype=F32)
    assert (our_logits(compat, tokens, batch) - hf_expected).abs().max().item() <= 1e-4
    # The library's own splitter writes exactly what Meta's rules give.
    save_mmllama(compat, tmp_path / "ours2", fmt="meta", n_shards=2)
    for i in range(2):
        got = torch.load(tmp_path / "ours2" / f"consolidated.{i:02d}.pth", weights_only=True)
        want = torch.load(two / f"consolidated.{i:02d}.pth", weights_only=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def assert_same_tensors(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("via", ["meta", "ours"])
def test_hf_round_trips_bit_exactly_and_transformers_reads_the_result(hub, tmp_path, via):
    from transformers import MllamaForConditionalGeneration

    path, tokens, batch, hf_expected, expected = hub
    assert convert_checkpoint(path, tmp_path / via, to=via) == via
    assert convert_checkpoint(tmp_path / via, tmp_path / "back", to="hf") == "hf"
    assert_same_tensors(path, tmp_path / "back")
    assert torch.equal(our_logits(MMLlama.from_pretrained(tmp_path / via, dtype=F32), tokens, batch), expected)
    reloaded = MllamaForConditionalGeneration.from_pretrained(tmp_path / "back", dtype=F32).eval()
    assert torch.equal(hf_logits(reloaded, tokens, batch), hf_expected)


def test_meta_to_meta_through_hf_keeps_every_tensor(hub, tmp_path):
    path = hub[0]
    convert_checkpoint(path, tmp_path / "meta")  # HF -> Meta by default
    assert convert_checkpoint(tmp_path / "meta", tmp_path / "hf") == "hf"  # Meta -> HF by default
    convert_checkpoint(tmp_path / "hf", tmp_path / "meta2", to="meta")
    a, b = (torch.load(p / "consolidated.00.pth", weights_only=True) for p in (tmp_path / "meta", tmp_path / "meta2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_converts_vision_checkpoints(hub, tmp_path):
    from mm_llama.cli import main

    assert main(["convert", "--input", str(hub[0]), "--output", str(tmp_path / "ours"), "--to", "ours"]) in (0, None)
    index = json.loads((tmp_path / "ours" / "mm_llama.json").read_text())
    # One part per module of MMLlama besides the trunk; configs where the part has one (semantics never stored).
    assert set(index["parts"]) == {"vision", "vision_projection", "image_adapter", "media"}
    assert set(index["parts"]) == set(MMLlama.from_pretrained(hub[0], dtype=F32).parts())
    assert "config" not in index["parts"]["media"] and index["parts"]["image_adapter"]["config"] == {
        "n_layers": 2, "layers": None}
    assert "intermediate_mode" not in index["parts"]["vision"]["config"]
    vision = load_file(tmp_path / "ours" / "vision.safetensors")
    assert vision and all(k.startswith("vision.") for k in vision)


def test_version_1_directories_still_load(hub, tmp_path):
    """mm-llama's format before the per-aspect-ratio tables (version 1): Meta's grids, the projection in "vision",
    the media rows in "image_adapter". Written here by hand from a current directory; it loads to the same logits."""
    from safetensors.torch import save_file

    from encoders.vision import TILE_TABLE_KEYS
    from encoders.vision_blocks import table_to_grid

    path, tokens, batch, _, expected = hub
    convert_checkpoint(path, tmp_path / "v2", to="ours")
    v2 = tmp_path / "v2"
    old = tmp_path / "v1"
    old.mkdir()
    shutil.copy(v2 / "trunk.safetensors", old)
    index = json.loads((v2 / "mm_llama.json").read_text())
    grids = {f"vision.{k}" for k in TILE_TABLE_KEYS}
    vision = {k: table_to_grid(v, k) if k in grids else v for k, v in load_file(v2 / "vision.safetensors").items()}
    save_file(vision | load_file(v2 / "vision_projection.safetensors"), old / "vision.safetensors")
    save_file(load_file(v2 / "image_adapter.safetensors") | load_file(v2 / "media.safetensors"),
              old / "image_adapter.safetensors")
    (old / "mm_llama.json").write_text(json.dumps({
        "format": "mm-llama", "version": 1, "trunk": index["trunk"],
        "parts": {"vision": {"config": index["parts"]["vision"]["config"], "weights": "vision.safetensors"},
                  "image_adapter": {"config": {"n_layers": 2}, "weights": "image_adapter.safetensors"}}}))
    assert torch.equal(our_logits(MMLlama.from_pretrained(old, dtype=F32), tokens, batch), expected)


def test_fine_tuned_transformers_checkpoints_load_and_convert(tmp_path):
    """What fine-tuning Llama 3.2 Vision in transformers gives: any `cross_attention_layers` list (here two blocks
    before the same trunk layer and one after the last) and per-aspect-ratio tile tables trained apart. They load
    and match transformers, convert to ours and back bit-identically, and only Meta's format refuses them."""
    from transformers import MllamaForConditionalGeneration

    hf, _ = tiny_mllama(seed=6, cross_attention_layers=(2, 3, 6), fine_tuned=True)  # 4 self-attention layers
    hf.save_pretrained(tmp_path / "hub")
    tokens, batch = inputs()
    expected = hf_logits(hf, tokens, batch)
    model = MMLlama.from_pretrained(tmp_path / "hub", hf_compat=True, dtype=F32)
    assert model.image_adapter.schedule == [2, 2, 4]  # HF index - block index: after the last layer is 4
    got = our_logits(model, tokens, batch)
    assert expected.abs().max() > 1.0 and (got - expected).abs().max().item() <= 1e-4
    table = model.vision.gated_positional_embedding
    assert table[0].abs().max() > 0  # the padding row is held too, not dropped

    assert convert_checkpoint(tmp_path / "hub", tmp_path / "ours", to="ours") == "ours"
    index = json.loads((tmp_path / "ours" / "mm_llama.json").read_text())
    assert index["parts"]["image_adapter"]["config"] == {"n_layers": 3, "layers": [2, 2, 4]}
    convert_checkpoint(tmp_path / "ours", tmp_path / "back", to="hf")
    assert_same_tensors(tmp_path / "hub", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["text_config"]["cross_attention_layers"] == [
        2, 3, 6]
    reloaded = MllamaForConditionalGeneration.from_pretrained(tmp_path / "back", dtype=F32).eval()
    assert torch.equal(hf_logits(reloaded, tokens, batch), expected)

    with pytest.raises(CheckpointError, match=r"\[2, 2, 4\].*'hf' or 'ours'"):
        convert_checkpoint(tmp_path / "hub", tmp_path / "meta", to="meta")
    assert not (tmp_path / "meta").exists()  # nothing half-written
    # The tables alone (Llama 3.2's own schedule) are refused too, naming the tensor.
    tables_only, _ = tiny_mllama(seed=6, fine_tuned=True)
    tables_only.save_pretrained(tmp_path / "tables")
    with pytest.raises(CheckpointError, match=r"gated_positional_embedding.*'hf' or 'ours'"):
        convert_checkpoint(tmp_path / "tables", tmp_path / "meta", to="meta")
    assert not (tmp_path / "meta").exists()


@pytest.fixture
def meta_dir(hub, tmp_path):
    convert_checkpoint(hub[0], tmp_path / "meta", to="meta", n_shards=2)
    return tmp_path / "meta"


def test_broken_meta_directories_fail_naming_the_file(meta_dir):
    params_file = meta_dir / "params.json"
    params = json.loads(params_file.read_text())
    params_file.write_text(json.dumps(params | {"vision_secret_sauce": 1}))
    with pytest.raises(ConfigError, match=r"params\.json.*vision_secret_sauce"):
        MMLlama.from_pretrained(meta_dir)
    params_file.write_text(json.dumps(params | {"vision_chunk_size": 560}))
    with pytest.raises(ConfigError, match=r"params\.json.*560.*5 rows"):
        MMLlama.from_pretrained(meta_dir)
    nested = {k: v for k, v in params.items() if k != "vision_num_cross_attention_layers"}
    params_file.write_text(json.dumps(nested | {"vision_model": {"cross_attention_adapter": {"num_layers": 2}}}))
    MMLlama.from_pretrained(meta_dir)  # Meta's nested form
    params_file.write_text(json.dumps(params))

    shard = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    shard["text_model.norm.weight"] = shard["text_model.norm.weight"][:-1]
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*text_model\.norm\.weight"):
        MMLlama.from_pretrained(meta_dir)
    (meta_dir / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth"):
        MMLlama.from_pretrained(meta_dir)


def test_shape_mismatch_names_the_directory(meta_dir):
    for i in range(2):
        file = meta_dir / f"consolidated.{i:02d}.pth"
        shard = torch.load(file, weights_only=True)
        shard["text_model.cross_attention_layers.1.ffn_norm.weight"] = torch.ones(3)
        torch.save(shard, file)
    with pytest.raises(CheckpointError, match=rf"{meta_dir}.*cross_attention_layers\.1\.ffn_norm.*\(3,\)"):
        MMLlama.from_pretrained(meta_dir)


def test_llama_32_vit_tile_size_comes_from_the_checkpoint(tmp_path):
    from mm_llama.checkpoints.mllama_meta import read_meta_mllama_config

    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
              "max_batch_size": 1, "max_seq_len": 8192, "vision_max_num_chunks": 4,
              "vision_model": {"cross_attention_adapter": {"num_layers": 8}}}
    (tmp_path / "params.json").write_text(json.dumps({"model": params}))
    for rows, tile in ((1025, 448), (1601, 560)):
        config = read_meta_mllama_config(tmp_path, positional_rows=rows)
        trunk, vision, cross = config.trunk, config.vision, config.image_adapter
        assert (vision.tile_size, vision.width, vision.n_layers, vision.n_global_layers) == (tile, 1280, 32, 8)
        assert vision.intermediate_layers == (3, 7, 15, 23, 30) and cross.n_layers == 8 and trunk.dim == 4096
    (tmp_path / "params.json").write_text(json.dumps(params | {"vision_chunk_size": 560}))
    with pytest.raises(ConfigError, match=r"params\.json.*vision_chunk_size 560.*1025 rows"):
        read_meta_mllama_config(tmp_path, positional_rows=1025)
    (tmp_path / "params.json").write_text(json.dumps(params | {"mm_llama_vision": {"wdith": 8}}))
    with pytest.raises(ConfigError, match=r"params\.json.*wdith"):
        read_meta_mllama_config(tmp_path, positional_rows=1025)
