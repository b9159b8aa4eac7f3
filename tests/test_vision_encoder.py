"""The image encoder against its peers: HF Mllama's vision model and open_clip's ViT, on CPU in fp32."""

from __future__ import annotations

import pytest
import torch

from encoders.vision import TILE_TABLE_KEYS, VISION_PRESETS, VisionConfig, VisionEncoder, tile_mask_from_ids
from encoders.vision_blocks import grid_to_table, table_to_grid
from encoders.vision_hf import vision_config_from_hf, vision_state_from_hf, vision_state_to_hf
from mm_llama.errors import CheckpointError, ConfigError, InputError

# (B=2, I=2): sample 0 = a 4-tile (2, 2) image and a 1-tile image; sample 1 = a (1, 2) image and a padding image.
ASPECT_IDS = torch.tensor([[6, 1], [2, 0]])


def hf_vision_model(intermediate_layers=(1, 3), seed: int = 0, fine_tuned: bool = False):
    """A tiny random `MllamaVisionModel` with unit-scale weights and non-zero gates. Its tile tables are those of
    random Meta grids (as in the released checkpoints), or with `fine_tuned` independent random values in every row
    and slot, row 0 included (what fine-tuning in transformers can make)."""
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    hf_config = MllamaVisionConfig(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                                   intermediate_size=64, image_size=28, patch_size=14, max_num_tiles=4,
                                   intermediate_layers_indices=list(intermediate_layers),
                                   vision_output_dim=32 * (1 + len(intermediate_layers)))
    model = MllamaVisionModel(hf_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:  # tanh gates in 0.5 .. 1.5: every gated path is active
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        if not fine_tuned:  # released checkpoints were precomputed from Meta's grids
            config = vision_config_from_hf(hf_config.to_dict())
            tables = {k: grid_to_table(0.2 * torch.randn(4, 4, *v.shape[2:], generator=g))
                      for k, v in VisionEncoder(config).state_dict().items() if k in TILE_TABLE_KEYS}
            for k, v in vision_state_to_hf(tables, config).items():
                model.get_parameter(k).copy_(v)
    return model, hf_config


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 2, 4, 3, 28, 28, generator=g)
    real = tile_mask_from_ids(ASPECT_IDS, 4)  # (2, 2, 4)
    return pixels * real[..., None, None, None], real  # empty tiles are zeros, as the image transform makes them


def ours_from_hf(model, hf_config, **overrides) -> VisionEncoder:
    config = VisionConfig(**{**vision_config_from_hf(hf_config.to_dict()).to_dict(), **overrides})
    encoder = VisionEncoder(config).eval()
    encoder.load_state_dict(vision_state_from_hf(model.state_dict(), config), strict=True)
    return encoder


def test_matches_hf_mllama_vision_model():
    model, hf_config = hf_vision_model()
    pixels, real = inputs()
    with torch.no_grad():
        expected = model(pixels, ASPECT_IDS, real.long()).last_hidden_state  # (B, I, T, L, D * 3)
        ours = ours_from_hf(model, hf_config, intermediate_mode="output")(pixels, ASPECT_IDS)
    assert expected.shape == ours.shape == (2, 2, 4, 5, 96)
    diff = (ours - expected)[real].abs().max().item()  # real tiles of real images only
    assert expected[real].abs().max() > 1.0  # unit-scale activations: the comparison means something
    assert diff < 1e-5, diff


def test_all_real_tiles_take_the_unmasked_path_and_still_match_hf():
    # Every image with all 4 tiles real: the encoder runs attention unmasked and recomputes the pad rows
    # (`PadTokens`), instead of the additive void<->void mask. HF applies the mask; the results must agree, pad
    # tokens included (real tokens attend to them in every later block).
    from encoders.vision_blocks import ImageTransformer, PadTokens, encoder_attention_mask

    model, hf_config = hf_vision_model()
    ids = torch.tensor([[6], [6]])  # (B=2, I=1), 2 x 2 tiles each
    pixels = torch.randn(2, 1, 4, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(pixels, ids, torch.ones(2, 1, 4, dtype=torch.long)).last_hidden_state
        ours = ours_from_hf(model, hf_config, intermediate_mode="output")(pixels, ids)
    assert expected.abs().max() > 1.0
    assert (ours - expected).abs().max() < 1e-5

    torch.manual_seed(0)
    blocks = ImageTransformer(2, width=32, n_heads=4, mlp_dim=64, norm_eps=1e-5, attn_bias=True, gated=False)
    x = torch.randn(2, 4 * 8, 32)  # 4 tiles of 5 tokens padded to 8
    x[:, 5::8] += 5  # pad rows that differ from the real rows: a wrong pad row would show
    fast = PadTokens.layout(4, 5, 8, x.device)
    assert (~fast.real[0]).nonzero().squeeze(1).tolist()[:4] == [5, 6, 7, 13] and int(fast.real.sum()) == 20
    masked = encoder_attention_mask(torch.ones(2, 4, dtype=torch.bool), 5, 8, x.dtype)
    with torch.no_grad():
        (a, fa), (b, fb) = blocks(x, fast, (0,)), blocks(x, masked, (0,))
    assert (a - b).abs().max() < 1e-5 and (fa[0] - fb[0]).abs().max() < 1e-5
    assert (a - blocks(x, None)[0]).abs().max() > 1e-2  # the pad rows really needed the fix


def test_meta_intermediate_mode_takes_the_input_of_each_block():
    # Meta's feature i is the input of block i = the output of block i-1: HF (output semantics) with indices
    # (0, 2) on the same weights must equal ours in "input" mode with (1, 3). Only the intermediates move.
    model, hf_config = hf_vision_model((1, 3))
    shifted, _ = hf_vision_model((0, 2))
    pixels, real = inputs()
    with torch.no_grad():
        hf_out = model(pixels, ASPECT_IDS, real.long()).last_hidden_state
        hf_shifted = shifted(pixels, ASPECT_IDS, real.long()).last_hidden_state
        meta = ours_from_hf(model, hf_config, intermediate_mode="input")(pixels, ASPECT_IDS)
    assert (meta - hf_out)[real][..., 32:].abs().max() > 1e-3  # the modes really differ
    assert (meta - hf_out)[real][..., :32].abs().max() < 1e-5  # the final features do not depend on the mode
    assert (meta - hf_shifted)[real].abs().max() < 1e-5


def test_real_tiles_see_empty_tile_slots_like_hf():
    # Meta's mask blocks only void<->void pairs, so real tokens attend to the (zero) empty tiles; what is in an
    # empty slot therefore changes real features, identically in HF and ours (parity holds with junk there too).
    model, hf_config = hf_vision_model()
    pixels, real = inputs()
    junk = pixels + 3 * (~real)[..., None, None, None] * torch.randn_like(pixels)
    encoder = ours_from_hf(model, hf_config, intermediate_mode="output")
    with torch.no_grad():
        clean, dirty = encoder(pixels, ASPECT_IDS), encoder(junk, ASPECT_IDS)
        hf_dirty = model(junk, ASPECT_IDS, real.long()).last_hidden_state
    assert (clean - dirty)[real].abs().max() > 1e-3
    assert (dirty - hf_dirty)[real].abs().max() < 1e-5


def test_fine_tuned_hf_tables_load_and_match_hf():
    # Tables with independent values in every row and slot: no Meta grid holds them, our tables do. In HF semantics
    # (tile 0 of a padding image counts as real) row 0 reaches the padding image's output and the empty-slot entries
    # reach the real tiles through attention, so the whole table is compared, for 4-, 1- and 2-tile images and a
    # padding image.
    model, hf_config = hf_vision_model(fine_tuned=True)
    encoder = ours_from_hf(model, hf_config, intermediate_mode="output")
    for key in TILE_TABLE_KEYS:  # the tables really are not a grid's
        with pytest.raises(CheckpointError):
            table_to_grid(encoder.get_parameter(key).detach(), key)
    pixels, real = inputs()
    hf_real = real.clone()
    hf_real[..., 0] = True  # HF marks tile 0 of every image slot, padding images included
    with torch.no_grad():
        expected = model(pixels, ASPECT_IDS, hf_real.long()).last_hidden_state
        ours = encoder(pixels, ASPECT_IDS, hf_real)
        assert expected[hf_real].abs().max() > 1.0
        assert (ours - expected)[hf_real].abs().max() < 1e-5
        for key in TILE_TABLE_KEYS:  # row 0 is not dead weight: it moves the padding image's tile 0
            encoder.get_parameter(key)[0] = 0
        moved = (encoder(pixels, ASPECT_IDS, hf_real) - ours)[1, 1, 0].abs().max()
    assert moved > 1e-3


def test_grid_table_round_trip_and_refusal():
    grid = torch.randn(4, 4, 5, 8, generator=torch.Generator().manual_seed(0))
    table = grid_to_table(grid)
    assert table.shape == (9, 4, 5, 8)
    assert not table[0].any() and not table[1, 1:].any() and torch.equal(table[6], grid[:2, :2].reshape(4, 5, 8))
    back = table_to_grid(table, "gated_positional_embedding")
    used = torch.zeros(4, 4, dtype=torch.bool)  # grid entries some aspect ratio reads: (i, j) with (i+1)(j+1) <= 4
    for i in range(4):
        used[i, : 4 // (i + 1)] = True
    assert torch.equal(back[used], grid[used])
    assert not back[~used].any()  # unused entries come back as zeros

    fresh = VisionEncoder(VisionConfig.preset("debug")).state_dict()  # a fresh encoder is grid-consistent
    for key in TILE_TABLE_KEYS:
        assert torch.equal(grid_to_table(table_to_grid(fresh[key], key)), fresh[key])

    independent = torch.randn(9, 4, 1, 8, generator=torch.Generator().manual_seed(1))
    padding_row, empty_slot = table.clone(), table.clone()
    padding_row[0, 0, 0, 0] = 1.0
    empty_slot[1, 3, 0, 0] = 1.0  # slot 3 of a 1-tile image
    for bad in (independent, padding_row, empty_slot):
        with pytest.raises(CheckpointError, match=r"pre_tile_pos_embed\.embedding.*'hf' or 'ours'"):
            table_to_grid(bad, "pre_tile_pos_embed.embedding")


def test_hf_conversion_round_trips():
    # Plain reshapes both ways: exact for any table, fine-tuned HF tables and our fresh ones alike.
    model, hf_config = hf_vision_model(fine_tuned=True)
    config = vision_config_from_hf(hf_config.to_dict())
    hf_state = model.state_dict()
    back = vision_state_to_hf(vision_state_from_hf(hf_state, config), config)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)

    ours = VisionEncoder(config).state_dict()
    again = vision_state_from_hf(vision_state_to_hf(ours, config), config)
    assert again.keys() == ours.keys()
    assert all(torch.equal(again[k], ours[k]) for k in ours)

    with pytest.raises(CheckpointError, match="unknown HF vision key"):
        vision_state_from_hf({**hf_state, "extra.weight": torch.zeros(1)}, config)
    with pytest.raises(CheckpointError, match="pre_tile_positional_embedding"):
        vision_state_from_hf({**hf_state, "pre_tile_positional_embedding.embedding.weight": torch.zeros(9, 100)},
                             config)


def test_from_open_clip_matches_open_clip():
    import open_clip

    torch.manual_seed(0)
    encoder = VisionEncoder.from_open_clip("ViT-B-16", pretrained=None, n_global_layers=1, max_tiles=1,
                                           intermediate_layers=(2, 5), intermediate_mode="output").eval()
    # pretrained=None is an explicitly random tower: build the same one again from the same seed.
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
    assert encoder.config.attn_bias and encoder.config.tile_size == 224 and encoder.config.pad_to_multiple == 0
    # The gated table is the local embedding in every used tile of the grid: row 0 (padding image) zeros.
    pos = visual.positional_embedding
    assert torch.equal(encoder.gated_positional_embedding, grid_to_table(pos.expand(1, 1, *pos.shape)))
    assert not encoder.gated_positional_embedding[0].any()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = encoder(image[:, None, None], torch.ones(1, 1, dtype=torch.long))[:, 0, 0]  # (1, 197, 768 * 3)
        # open_clip's intermediates are block OUTPUTS, i.e. our "output" mode. The comparison is exact in kind: NLC
        # token tensors with the class token kept (output_extra_tokens), no reshaping on either side; the last
        # block's output (index 11) goes through open_clip's own ln_post for the final features.
        out = visual.forward_intermediates(image, indices=[2, 5, 11], output_fmt="NLC", output_extra_tokens=True,
                                           intermediates_only=True)
    tokens = [torch.cat([cls, patches], dim=1)  # (1, 197, 768) each
              for cls, patches in zip(out["image_intermediates_prefix"], out["image_intermediates"], strict=True)]
    width = 768
    with torch.no_grad():
        final = visual.ln_post(tokens[2])
    assert (feats[..., :width] - final).abs().max() < 1e-5  # zero gates: global layers + post-tile embedding = id
    inter = feats[..., width:].unflatten(-1, (width, 2))  # Meta's interleaved layout: channel d*K + k
    for k in range(2):
        assert (inter[..., k] - tokens[k]).abs().max() < 1e-5
    assert (inter[..., 1] - inter[..., 0]).abs().max() > 1e-2  # the two layers really differ


def test_zero_gates_make_global_layers_identity_and_encoder_deterministic():
    torch.manual_seed(0)
    config = VisionConfig.preset("debug")
    encoder = VisionEncoder(config).eval()
    without = VisionEncoder(VisionConfig.preset("debug", n_global_layers=0)).eval()
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("global_transformer.")}
    without.load_state_dict(state, strict=True)
    pixels, _ = inputs()
    with torch.no_grad():
        a, b = encoder(pixels, ASPECT_IDS), encoder(pixels, ASPECT_IDS)
        c = without(pixels, ASPECT_IDS)
    assert torch.equal(a, b)
    assert torch.equal(a, c)  # tanh(0) = 0 exactly: the fresh global layers and post-tile embedding are identities


def test_presets_and_derived_sizes():
    big = VisionConfig.preset("3.2-11B")
    assert (big.tokens_per_tile, big.padded_tokens_per_tile, big.output_dim) == (1601, 1608, 7680)
    assert VisionConfig.preset("3.2-11B", tile_size=448).tokens_per_tile == 1025
    paper = VisionConfig.preset("paper")
    assert (paper.n_layers + paper.n_global_layers, paper.tokens_per_tile, paper.output_dim) == (40, 257, 7680)
    assert VisionConfig.preset("openclip-vit-h-14").padded_tokens_per_tile == 257
    assert set(VISION_PRESETS) == {"3.2-11B", "paper", "openclip-vit-h-14", "debug"}
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    assert tile_mask_from_ids(ids, 4).sum(-1).tolist() == [0, 1, 2, 3, 4, 2, 4, 3, 4]


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(width=30), "n_heads"),
    (dict(tile_size=30), "tile_size"),
    (dict(intermediate_layers=(3, 1)), "intermediate_layers"),
    (dict(intermediate_layers=(4,)), "intermediate_layers"),
    (dict(intermediate_mode="hf"), "intermediate_mode"),
    (dict(pad_to_multiple=-1), "pad_to_multiple"),
    (dict(n_layers=0), "n_layers"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(colour=1), "colour"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        VisionConfig.preset("debug", **overrides)


def test_bad_inputs_are_rejected():
    encoder = VisionEncoder(VisionConfig.preset("debug"))
    pixels, _ = inputs()
    with pytest.raises(InputError, match="pixel_values"):
        encoder(pixels[:, :, :2], ASPECT_IDS)
    with pytest.raises(InputError, match=r"\[0, 8\]"):
        encoder(pixels, torch.tensor([[9, 1], [2, 0]]))
    with pytest.raises(ConfigError, match="unknown vision preset"):
        VisionConfig.preset("ViT-G")


def test_unmasked_path_trains_under_torch_compile_with_activation_checkpointing():
    # The training loop compiles (and may checkpoint) each ViT block; the pad-row recomputation must survive
    # torch.compile's backward (index_copy did not, in torch 2.11) and give eager's gradients.
    from torch.distributed._composable import checkpoint

    from encoders.vision_blocks import ImageTransformerBlock, PadTokens

    torch.manual_seed(0)
    eager = ImageTransformerBlock(32, 4, 64, 1e-5, attn_bias=False, gated=False)
    compiled = ImageTransformerBlock(32, 4, 64, 1e-5, attn_bias=False, gated=False)
    compiled.load_state_dict(eager.state_dict())
    checkpoint(compiled)
    compiled.compile()
    x = torch.randn(2, 32, 32)
    mask = PadTokens.layout(4, 5, 8, x.device)
    grads = []
    for block in (eager, compiled):
        inp = x.clone().requires_grad_(True)
        (block(inp, mask) ** 2).sum().backward()
        grads.append((inp.grad, block.attn.wq.weight.grad))
    assert grads[0][0].abs().max() > 0.1
    for a, b in zip(grads[0], grads[1], strict=True):
        assert (a - b).abs().max() < 1e-4
