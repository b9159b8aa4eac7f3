"""The gated cross-attention adapter and MMLlama's layer loop: schedule, masks, identity at zero gates, and parity
with transformers' Mllama text model (fed the same projected vision tokens)."""

import pytest
import torch

from adapters.cross_attention import CrossAttentionConfig, cross_attention_mask, fusion_schedule, image_spans
from conftest import randomize_
from mm_llama.checkpoints.mllama_hf import text_state_from_hf, text_state_to_hf
from mm_llama.errors import InputError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.model import MMLlama

IMG = 300  # the image token of a 300-token vocabulary: the first media row
TOKENS_PER_TILE, TILES = 5, 4


def test_fusion_schedule_matches_llama_3_2():
    assert fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]  # 11B
    assert fusion_schedule(80, 20) == list(range(3, 80, 4))  # 90B
    assert fusion_schedule(4, 2) == [1, 3]


def test_image_spans_follow_meta():
    assert image_spans([1, 2, IMG, 5, 6], IMG) == [(2, 5)]
    assert image_spans([IMG, 5, IMG, 6, 7], IMG) == [(0, 2), (2, 5)]
    # Consecutive images share the text that follows them.
    assert image_spans([1, IMG, IMG, 6, 7, IMG, 9], IMG) == [(1, 5), (2, 5), (5, 7)]
    assert image_spans([1, 2, 3], IMG) == []


def test_cross_attention_mask_shapes_tiles_and_rows():
    tokens = torch.tensor([[1, IMG, 5, IMG, 6], [IMG, 2, 3, 4, 5]])
    tile_mask = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    mask, rows = cross_attention_mask(tokens, IMG, [2, 1], tile_mask, TOKENS_PER_TILE)
    assert mask.shape == (2, 1, 5, 2 * TILES * TOKENS_PER_TILE) and rows.shape == (2, 5, 1)
    assert rows[:, :, 0].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert mask[0, 0, 0].all()  # no image seen yet: a uniform row (zeroed by `rows`)
    per_token = mask[0, 0, 2].view(2, TILES, TOKENS_PER_TILE)
    assert per_token[0, :2].all() and not per_token[0, 2:].any() and not per_token[1].any()  # image 0, real tiles
    assert mask[0, 0, 4].view(2, TILES, TOKENS_PER_TILE)[1, 0].all()  # image 1 from its token on
    assert mask[1, 0, 3].view(2, TILES, TOKENS_PER_TILE)[0].all()
    with pytest.raises(InputError, match="sample 1 has 1 <|image|> token"):
        cross_attention_mask(tokens, IMG, [2, 2], tile_mask, TOKENS_PER_TILE)


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
    trunk_config = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16,
                               ffn_dim_multiplier=176 / 170, norm_eps=1e-5, use_scaled_rope=True,
                               rope_original_context=16)
    assert trunk_config.ffn_hidden_dim == 176
    model = MMLlama.with_image_adapter(Llama(trunk_config), CrossAttentionConfig(
        n_layers=2, mask_attention_rows=mask_attention_rows))
    state = text_state_from_hf(hf.state_dict(), trunk_config, model.image_adapter.schedule)
    model.load_state_dict(state, strict=True)
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
        for i, (start, end) in enumerate(image_spans(row, IMG)):
            dense[b, start:end, i] = tile_mask[b, i].float()
    mask, rows = _prepare_cross_attention_mask(dense, TOKENS_PER_TILE, torch.float32)
    with torch.no_grad():
        return hf(input_ids=tokens, cross_attention_states=vision, cross_attention_mask=mask,
                  full_text_row_masked_out_mask=rows, use_cache=False).logits


def our_logits(model, tokens, tile_mask, n_images, vision):
    mask, rows = cross_attention_mask(tokens, IMG, n_images, tile_mask, TOKENS_PER_TILE)
    with torch.no_grad():
        return model(tokens, cross_kv=model.cross_kv(vision), cross_mask=mask, rows=rows)


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
    model = MMLlama.with_image_adapter(trunk, CrossAttentionConfig(n_layers=1)).eval()
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


def test_generation_with_images_batched_equals_alone_and_full_forward():
    from mm_llama.generate import Generator, Sampling
    from mm_llama.model import VisionInputs

    hf = tiny_hf_text_model(seed=3)
    model = ours_from_hf(hf, mask_attention_rows=True)
    g = torch.Generator().manual_seed(4)
    prompts = [[5, 6, IMG, 7, 8, 9], [IMG, 11, 12], [13, 14, 15, 16]]  # different lengths, 1, 1 and 0 images
    vision = torch.randn(3, 1 * TILES * TOKENS_PER_TILE, 64, generator=g)
    tile_mask = torch.tensor([[[1, 1, 0, 0]], [[1, 1, 1, 1]], [[0, 0, 0, 0]]], dtype=torch.bool)
    inputs = VisionInputs(vision, tile_mask, [1, 1, 0], TOKENS_PER_TILE)
    generator = Generator(model)
    sampling = Sampling(max_new_tokens=12)
    batched = generator.generate(prompts, sampling, vision=inputs)
    for b, prompt in enumerate(prompts):
        alone = VisionInputs(vision[b:b + 1], tile_mask[b:b + 1], [inputs.n_images[b]], TOKENS_PER_TILE)
        assert generator.generate([prompt], sampling, vision=alone)[0] == batched[b]
        # And each new token is the argmax of a full forward over the whole sequence so far.
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                tokens = torch.tensor([sequence])
                cross = model.cross_inputs(tokens, alone)
                sequence.append(model(tokens, **cross)[0, -1].argmax().item())
        assert sequence[len(prompt):] == batched[b], b
    assert len({tuple(t) for t in batched}) == 3
