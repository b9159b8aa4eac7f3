"""The gated cross-attention adapter and MMLlama's layer loop: schedule, masks, identity at zero gates, parity with
transformers' Mllama text model (fed the same projected vision tokens), and the splice path."""

import pytest
import torch

from adapters.cross_attention import (
    CrossAttentionBlock,
    CrossAttentionConfig,
    cross_attention_inputs,
    cross_attention_schedule,
    fusion_schedule,
    media_spans,
)
from conftest import randomize_
from encoders.vision import VisionConfig
from mm_llama.checkpoints.mllama_hf import text_state_from_hf, text_state_to_hf
from mm_llama.errors import ConfigError, InputError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.media import EmbeddingSpans, Media, MediaState
from mm_llama.model import MMConfig, MMLlama

IMG = 300  # the image token of a 300-token vocabulary: the first media row
TOKENS_PER_TILE, TILES = 5, 4


def test_fusion_schedule_matches_llama_3_2():
    assert fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]  # 11B
    assert fusion_schedule(80, 20) == list(range(3, 80, 4))  # 90B
    assert fusion_schedule(4, 2) == [1, 3]


def test_explicit_schedules_are_checked():
    assert cross_attention_schedule(4, CrossAttentionConfig(n_layers=2)) == [1, 3]
    assert cross_attention_schedule(4, CrossAttentionConfig(n_layers=3, layers=(0, 0, 4))) == [0, 0, 4]
    with pytest.raises(ConfigError, match="past the trunk's 4 layers"):
        cross_attention_schedule(4, CrossAttentionConfig(n_layers=1, layers=(5,)))
    with pytest.raises(ConfigError, match="non-decreasing"):
        CrossAttentionConfig(n_layers=2, layers=(3, 1))
    with pytest.raises(ConfigError, match="2 entries but n_layers is 8"):
        CrossAttentionConfig(layers=(1, 3))


def test_media_spans_follow_meta():
    assert media_spans([1, 2, IMG, 5, 6], IMG) == [(2, 5)]
    assert media_spans([IMG, 5, IMG, 6, 7], IMG) == [(0, 2), (2, 5)]
    # Consecutive images share the text that follows them.
    assert media_spans([1, IMG, IMG, 6, 7, IMG, 9], IMG) == [(1, 5), (2, 5), (5, 7)]
    assert media_spans([1, 2, 3], IMG) == []


def test_cross_attention_mask_shapes_tiles_and_rows():
    tokens = [[1, IMG, 5, IMG, 6], [IMG, 2, 3, 4, 5]]
    tile_mask = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    source = torch.zeros(2, 2 * TILES * TOKENS_PER_TILE, 8)
    inputs = cross_attention_inputs(tokens, IMG, [2, 1], tile_mask, TOKENS_PER_TILE, source=source)
    mask, rows = inputs.mask, inputs.rows
    assert mask.shape == (2, 1, 5, 2 * TILES * TOKENS_PER_TILE) and rows.shape == (2, 5, 1)
    assert not inputs.last_sees_all  # sample 0's last position sees 1 tile of its second image only
    assert rows[:, :, 0].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert mask[0, 0, 0].all()  # no image seen yet: a uniform row (zeroed by `rows`)
    per_token = mask[0, 0, 2].view(2, TILES, TOKENS_PER_TILE)
    assert per_token[0, :2].all() and not per_token[0, 2:].any() and not per_token[1].any()  # image 0, real tiles
    assert mask[0, 0, 4].view(2, TILES, TOKENS_PER_TILE)[1, 0].all()  # image 1 from its token on
    assert mask[1, 0, 3].view(2, TILES, TOKENS_PER_TILE)[0].all()
    with pytest.raises(InputError, match="sample 1 has 1 media token"):
        cross_attention_inputs(tokens, IMG, [2, 2], tile_mask, TOKENS_PER_TILE, source=source)
    decode = cross_attention_inputs(tokens, IMG, [2, 1], tile_mask, TOKENS_PER_TILE, kv=[(source, source)]).for_decode()
    assert torch.equal(decode.mask, mask[:, :, -1:]) and torch.equal(decode.rows, rows[:, -1:])
    one = [[1, IMG, 5], [IMG, 2, 3]]  # one image each, every tile real: the last positions see every image token
    kv = [(source[:, :TILES * TOKENS_PER_TILE],) * 2]
    assert cross_attention_inputs(one, IMG, [1, 1], torch.ones(2, 1, TILES, dtype=torch.bool), TOKENS_PER_TILE,
                                  kv=kv).for_decode().mask is None  # so a decode step needs no mask


def tiny_hf_text_model(seed=0):
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import MllamaForCausalLM

    config = MllamaTextConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 4],
                              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                                  "factor": 8.0, "low_freq_factor": 1.0,
                                                                  "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 16})
    torch.manual_seed(seed)
    model = randomize_(MllamaForCausalLM(config), seed).eval()
    with torch.no_grad():  # every gate non-zero, of both signs
        for i, name in enumerate(n for n, _ in model.named_parameters() if n.endswith("_gate")):
            model.get_parameter(name).fill_(0.8 if i % 2 else -0.6)
    return model


def ours_from_hf(hf, mask_attention_rows: bool) -> MMLlama:
    """The text side of HF's model in ours (the ViT is there, unused: the tests feed projected vision tokens)."""
    trunk_config = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16,
                               ffn_dim_multiplier=176 / 170, norm_eps=1e-5, use_scaled_rope=True,
                               rope_original_context=16)
    assert trunk_config.ffn_hidden_dim == 176
    adapter = CrossAttentionConfig(n_layers=2, mask_attention_rows=mask_attention_rows)
    model = MMLlama(MMConfig(trunk=trunk_config, vision=VisionConfig.preset("debug"), image_adapter=adapter))
    state = text_state_from_hf(hf.state_dict(), trunk_config, model.image_adapter.schedule)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("vision.", "vision_projection.")) for k in missing)
    return model.eval()


def batch():
    """A chat-like prompt (text before the image), a sample with two images, padded tiles, padded image slots."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (2, 24), generator=g)
    tokens[0, 6], tokens[1, 3], tokens[1, 15] = IMG, IMG, IMG
    tile_mask = torch.tensor([[[1, 1, 1, 1], [0, 0, 0, 0]], [[1, 1, 0, 0], [1, 0, 0, 0]]], dtype=torch.bool)
    vision = torch.randn(2, 2 * TILES * TOKENS_PER_TILE, 64, generator=g)
    return tokens, tile_mask, [1, 2], vision


def hf_logits(hf, tokens, tile_mask, n_images, vision):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    dense = torch.zeros(2, tokens.shape[1], 2, TILES)
    for b, row in enumerate(tokens.tolist()):
        for i, (start, end) in enumerate(media_spans(row, IMG)):
            dense[b, start:end, i] = tile_mask[b, i].float()
    mask, rows = _prepare_cross_attention_mask(dense, TOKENS_PER_TILE, torch.float32)
    with torch.no_grad():
        return hf(input_ids=tokens, cross_attention_states=vision, cross_attention_mask=mask,
                  full_text_row_masked_out_mask=rows, use_cache=False).logits


def our_logits(model, tokens, tile_mask, n_images, vision):
    """The layer loop fed projected vision tokens directly (keys/values computed once, as generation does)."""
    with torch.no_grad():
        inputs = cross_attention_inputs(tokens.tolist(), IMG, n_images, tile_mask, TOKENS_PER_TILE,
                                        kv=model.image_adapter.kv(vision))
        return model.step(tokens, MediaState({"image_adapter": inputs})).logits


def test_hf_compatible_rows_match_transformers_exactly():
    hf = tiny_hf_text_model()
    args = batch()
    expected = hf_logits(hf, *args)
    got = our_logits(ours_from_hf(hf, mask_attention_rows=False), *args)
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-4


def test_meta_row_mask_differs_only_where_text_precedes_the_image():
    hf = tiny_hf_text_model()
    tokens, tile_mask, n_images, vision = batch()
    meta = our_logits(ours_from_hf(hf, mask_attention_rows=True), tokens, tile_mask, n_images, vision)
    expected = hf_logits(hf, tokens, tile_mask, n_images, vision)
    assert (meta[0] - expected[0]).abs().max() > 1e-3  # sample 0 has 6 text tokens before its image
    # A sample whose image comes first has no row without an image: both semantics agree.
    first = tokens.clone()
    first[0, 6], first[0, 0] = 7, IMG
    meta = our_logits(ours_from_hf(hf, mask_attention_rows=True), first, tile_mask, n_images, vision)
    assert (meta[0] - hf_logits(hf, first, tile_mask, n_images, vision)[0]).abs().max() <= 1e-4


def test_hf_text_weights_round_trip():
    hf = tiny_hf_text_model()
    model = ours_from_hf(hf, mask_attention_rows=True)
    back = text_state_to_hf(model.state_dict(), model.trunk.config, model.image_adapter.schedule)
    original = hf.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_identity_at_zero_gates_and_text_only_bit_identical():
    torch.manual_seed(0)
    trunk = Llama(LlamaConfig.preset("debug", vocab_size=300))
    trunk.init_weights(std=0.3)
    config = MMConfig(trunk=trunk.config, vision=VisionConfig.preset("debug"),
                      image_adapter=CrossAttentionConfig(n_layers=1))
    model = MMLlama(config, trunk=trunk).eval()
    for p in model.image_adapter.parameters():  # random adapter weights, but the gates stay at zero
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    tokens, tile_mask, n_images, vision = batch()
    with torch.no_grad():
        composed = our_logits(model, tokens, tile_mask, n_images, vision)
        alone = trunk(embeddings=model.embed(tokens))
        assert torch.equal(composed, alone)
        text = torch.randint(0, 300, (2, 17))
        assert torch.equal(model(text), trunk(text))  # no media: the cross blocks are skipped entirely
    model.image_adapter.cross_attention_layers[0].gate_attn.data.fill_(0.5)
    with torch.no_grad():
        assert not torch.equal(our_logits(model, tokens, tile_mask, n_images, vision), alone)
        assert torch.equal(model(text), trunk(text))  # open gates (the demo's gate_init) leave text-only prompts alone


def test_gate_init_sets_both_gates_and_is_checked():
    trunk = LlamaConfig.preset("debug", vocab_size=300)
    block = CrossAttentionBlock(trunk, CrossAttentionConfig(n_layers=1, gate_init=0.25))
    assert block.gate_attn.item() == block.gate_ffwd.item() == 0.25
    assert CrossAttentionBlock(trunk, CrossAttentionConfig(n_layers=1)).gate_attn.item() == 0.0  # the paper's
    for bad in (float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match="gate_init must be a finite number"):
            CrossAttentionConfig(gate_init=bad)


def test_splice_places_embeddings_at_their_positions():
    """Embeddings spliced into the token stream (the speech path): equal to the trunk fed the same embeddings by
    hand, causal (positions before a span are untouched), and exactly at the given positions (a span placed one
    position off changes the logits)."""
    torch.manual_seed(0)
    trunk = Llama(LlamaConfig.preset("debug", vocab_size=300))
    trunk.init_weights(std=0.3)
    model = MMLlama(MMConfig(trunk=trunk.config), trunk=trunk).eval()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 300, (2, 12), generator=g)
    a, b = torch.randn(3, 64, generator=g), torch.randn(2, 64, generator=g)
    spans = EmbeddingSpans([a, b], samples=[0, 1], starts=[4, 7])
    with torch.no_grad():
        got = model(tokens, Media(embeddings=spans))
        by_hand = trunk.embed(tokens)
        by_hand[0, 4:7], by_hand[1, 7:9] = a, b
        assert torch.equal(got, trunk(embeddings=by_hand))
        plain = model(tokens)
        assert torch.equal(got[0, :4], plain[0, :4]) and torch.equal(got[1, :7], plain[1, :7])  # causal
        assert (got[0, 4] - plain[0, 4]).abs().max() > 1e-2 and (got[1, 7] - plain[1, 7]).abs().max() > 1e-2
        shifted = model(tokens, Media(embeddings=EmbeddingSpans([a, b], samples=[0, 1], starts=[5, 7])))
        assert (shifted[0, 4] - got[0, 4]).abs().max() > 1e-2
        # Generation left-pads shorter rows: the spans move with their row.
        state = model.prepare([[0, 0, *tokens[0, :10].tolist()], tokens[1].tolist()], Media(embeddings=spans),
                              left_pad=[2, 0])
        assert state.splice.cols.tolist() == [6, 7, 8, 7, 8] and state.splice.rows.tolist() == [0, 0, 0, 1, 1]
    for bad, match in ((EmbeddingSpans([a], samples=[2], starts=[0]), "sample 2 is not in a batch of 2"),
                       (EmbeddingSpans([a], samples=[0], starts=[10]), "outside its 12 tokens"),
                       (EmbeddingSpans([a, b], samples=[0, 0], starts=[0, 2]), "overlaps"),
                       (EmbeddingSpans([torch.randn(2, 8)], samples=[0], starts=[0]), "width 8")):
        with pytest.raises(InputError, match=match):
            model(tokens, Media(embeddings=bad))


def test_patch_positions_are_added_to_the_image_tokens_as_loud_as_each_token():
    from adapters.image import VisionProjection
    from encoders.vision_blocks import patch_position_table

    plain_config = VisionConfig.preset("debug", tile_size=84, max_tiles=1)  # 6 x 6 patches
    plain = VisionProjection(plain_config, 64)
    assert set(plain.state_dict()) == {"weight", "bias"}  # off by default: Llama 3.2's keys, unchanged
    config = VisionConfig.preset("debug", tile_size=84, max_tiles=1, patch_position_features=True)
    assert VisionConfig.from_dict(config.to_dict()) == config
    placed = VisionProjection(config, 64)
    placed.load_state_dict(plain.state_dict(), strict=False)
    assert set(placed.state_dict()) == {"weight", "bias", "position_scale"} and placed.position_scale.item() == 1
    features = torch.randn(2, 1, 1, config.tokens_per_tile, config.output_dim)  # (B, I, T, L, F)
    base = plain(features)
    table = patch_position_table(6, 64)
    assert table.shape == (37, 64) and not table[0].any() and table.abs().max() <= 1
    assert torch.cdist(table[1:], table[1:]).fill_diagonal_(1).min() > 0.1  # every patch a different place
    loudness = base.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(placed(features) - base, loudness * table, atol=1e-5)
    with torch.no_grad():
        placed.position_scale.fill_(0.5)
    out = placed(features)
    assert torch.allclose(out - base, 0.5 * loudness * table, atol=1e-5)
    assert torch.equal(out[..., 0, :], base[..., 0, :])  # the class token has no place
    out.pow(2).mean().backward()
    assert placed.position_scale.grad.abs() > 0  # learned
    with pytest.raises(ConfigError, match="patch_position_features must be a bool"):
        VisionConfig.preset("debug", patch_position_features="yes")
    # In the composed model: only the projection gains the scale; a plain model's keys are unchanged.
    trunk = LlamaConfig.preset("debug")
    adapter = CrossAttentionConfig(n_layers=1)
    keys = set(MMLlama(MMConfig(trunk=trunk, vision=config, image_adapter=adapter)).state_dict())
    plain_keys = set(MMLlama(MMConfig(trunk=trunk, vision=plain_config, image_adapter=adapter)).state_dict())
    assert keys - plain_keys == {"vision_projection.position_scale"} and plain_keys <= keys
