"""The whole image path against transformers' MllamaForConditionalGeneration on a random tiny config with every gate
non-zero: the same weights, pixels and prompts give the same logits in HF-compatible mode, and the two documented
switches (intermediate features, attention-row mask) are what separates Meta's semantics from HF's."""

import pytest
import torch

from adapters.cross_attention import CrossAttentionConfig, media_spans
from conftest import randomize_
from encoders.image_transform import Images, ImageTransform, ImageTransformConfig, collate_images
from encoders.vision import VisionEncoder
from encoders.vision_hf import vision_config_from_hf, vision_state_to_hf
from mm_llama.checkpoints.mllama_hf import mmllama_state_from_hf
from mm_llama.llama import LlamaConfig
from mm_llama.media import Media
from mm_llama.model import MMConfig, MMLlama

IMG, TILE = 300, 28


def tiny_mllama(seed=0, vocab_size=300, *, cross_attention_layers=(1, 4), fine_tuned=False):
    """A random tiny `MllamaForConditionalGeneration` with every gate non-zero. Its per-aspect-ratio tile tables are
    Meta-grid-consistent (what checkpoints converted from Meta's have), or, `fine_tuned`, independent in every row
    and slot (what fine-tuning in transformers makes of them)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from encoders.vision import TILE_TABLE_KEYS
    from encoders.vision_blocks import grid_to_table

    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  image_size=TILE, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
                  vision_output_dim=96, num_channels=3)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                num_hidden_layers=4 + len(cross_attention_layers), num_attention_heads=4, num_key_value_heads=2,
                cross_attention_layers=list(cross_attention_layers), rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size)
    torch.manual_seed(seed)
    model = randomize_(MllamaForConditionalGeneration(config), seed).eval()
    with torch.no_grad():  # every gate non-zero
        gates = [p for n, p in model.named_parameters() if "gate" in n and p.numel() == 1]
        for i, p in enumerate(gates):
            p.fill_(0.9 if i % 2 else -0.7)
        if fine_tuned:
            return model, config
        # Checkpoints converted from Meta's [4, 4, ...] grids have consistent tables: take those of random grids.
        vision_config = vision_config_from_hf(config.vision_config.to_dict())
        g = torch.Generator().manual_seed(seed + 1)
        state = VisionEncoder(vision_config).state_dict()
        grids = {k: grid_to_table(torch.randn(4, 4, *state[k].shape[2:], generator=g) * 0.3) for k in TILE_TABLE_KEYS}
        for key, value in vision_state_to_hf(grids, vision_config, prefix="model.vision_model.").items():
            model.get_parameter(key).copy_(value)
    return model, config


def ours(hf, config, *, hf_compat: bool) -> MMLlama:
    trunk = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16,
                        ffn_dim_multiplier=176 / 170, norm_eps=1e-5)
    mm = MMConfig(trunk=trunk, vision=vision_config_from_hf(config.vision_config.to_dict()),
                  image_adapter=CrossAttentionConfig(n_layers=2)).with_semantics(hf_compat)
    model = MMLlama(mm)
    model.load_state_dict(mmllama_state_from_hf(hf.state_dict(), mm))
    return model.eval()


def inputs():
    """Two samples: a chat prompt with text before one 4-tile image; two images (one with a padded tile slot)."""
    g = torch.Generator().manual_seed(5)
    transform = ImageTransform(ImageTransformConfig(tile_size=TILE, max_tiles=4))
    images = [[transform(torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8, generator=g).numpy())],
              [transform(torch.randint(0, 256, (20, 60, 3), dtype=torch.uint8, generator=g).numpy()),
               transform(torch.randint(0, 256, (30, 30, 3), dtype=torch.uint8, generator=g).numpy())]]
    batch = collate_images(images)  # Images
    tokens = torch.randint(3, 300, (2, 20), generator=g)
    tokens[0, 5], tokens[1, 2], tokens[1, 12] = IMG, IMG, IMG
    return tokens, batch


def hf_logits(hf, tokens, images: Images):
    n_tiles = images.tile_mask.sum(-1)
    dense = torch.zeros(2, tokens.shape[1], 2, 4, dtype=torch.long)
    for b, row in enumerate(tokens.tolist()):
        for i, (start, end) in enumerate(media_spans(row, IMG)):
            dense[b, start:end, i, : n_tiles[b, i]] = 1
    aspect_mask = images.tile_mask.clone().long()
    aspect_mask[..., 0] = 1  # HF marks tile 0 of every slot, padding images included
    with torch.no_grad():
        return hf(input_ids=tokens, pixel_values=images.pixel_values, aspect_ratio_ids=images.aspect_ratio_ids,
                  aspect_ratio_mask=aspect_mask, cross_attention_mask=dense, use_cache=False).logits


def our_logits(model, tokens, images: Images):
    with torch.no_grad():
        return model(tokens, Media(images=images))


@pytest.fixture(scope="module")
def reference():
    hf, config = tiny_mllama()
    tokens, batch = inputs()
    return hf, config, tokens, batch, hf_logits(hf, tokens, batch)


def test_hf_compatible_mode_equals_transformers(reference):
    hf, config, tokens, batch, expected = reference
    got = our_logits(ours(hf, config, hf_compat=True), tokens, batch)
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-4


def test_each_switch_alone_moves_away_from_transformers(reference):
    hf, config, tokens, batch, expected = reference
    model = ours(hf, config, hf_compat=True)
    model.vision.config.intermediate_mode = "input"  # Meta's intermediate features only
    assert (our_logits(model, tokens, batch) - expected).abs().max() > 1e-3
    model = ours(hf, config, hf_compat=True)
    for block in model.image_adapter.cross_attention_layers:  # Meta's row mask only
        block.mask_attention_rows = True
    assert (our_logits(model, tokens, batch) - expected).abs().max() > 1e-3  # text before the images
    # When every sample starts with its image no position lacks an image, and the row mask changes nothing.
    first = tokens.clone()
    first[0, 5], first[0, 0], first[1, 2], first[1, 0] = 7, IMG, 7, IMG
    assert (our_logits(model, first, batch) - hf_logits(hf, first, batch)).abs().max() <= 1e-4


def test_from_pretrained_reads_transformers_directories(reference, tmp_path):
    hf, config, tokens, batch, expected = reference
    hf.save_pretrained(tmp_path / "hub")  # transformers writes the hub names (language_model.model.*, ...)
    model = MMLlama.from_pretrained(tmp_path / "hub", hf_compat=True, dtype=torch.float32)
    assert (our_logits(model, tokens, batch) - expected).abs().max().item() <= 1e-4
    meta_semantics = MMLlama.from_pretrained(tmp_path / "hub", dtype=torch.float32)
    assert meta_semantics.vision.config.intermediate_mode == "input"
    assert not meta_semantics.config.vision.hf_padding_images
    assert all(b.mask_attention_rows for b in meta_semantics.image_adapter.cross_attention_layers)
    # The runtime names of transformers >= 4.52 load too.
    from safetensors.torch import load_file, save_file

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (runtime / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    from mm_llama.checkpoints.mllama_hf import hub_to_runtime

    hub = load_file(tmp_path / "hub" / "model.safetensors")
    renamed = {hub_to_runtime(k): v for k, v in hub.items()}
    assert any(k.startswith("model.language_model.") for k in renamed) and renamed.keys().isdisjoint(hub)
    save_file(renamed, runtime / "model.safetensors")
    model = MMLlama.from_pretrained(runtime, hf_compat=True, dtype=torch.float32)
    assert (our_logits(model, tokens, batch) - expected).abs().max().item() <= 1e-4


def test_ask_answers_about_an_image_and_checks_its_inputs(tmp_path):
    from PIL import Image

    from mm_llama.errors import InputError
    from mm_llama.generate import Generator, Sampling
    from mm_llama.tokenizer import Tokenizer, write_ranks

    hf, _ = tiny_mllama(seed=2, vocab_size=512)  # a byte-level tokenizer has 256 ranks + 256 specials
    hf.save_pretrained(tmp_path / "ckpt")
    write_ranks(tmp_path / "ckpt" / "tokenizer.model", {bytes([b]): b for b in range(256)})
    model = MMLlama.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(picture)
    answer = model.ask("What colour is it?", image=str(picture), max_new_tokens=8)
    # The same answer by hand: chat format with <|image|> first in the user message, greedy, image K/V once.
    tok = Tokenizer.from_file(tmp_path / "ckpt" / "tokenizer.model")
    prompt = tok.encode_dialog([{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": "What colour is it?"}]}])
    assert prompt.count(model.image_id) == 1
    images = Images.prepare([[str(picture)]], tile_size=TILE, max_tiles=4)
    ids = Generator(model).generate([prompt], Sampling(max_new_tokens=8), tok.stop_tokens, Media(images=images))[0]
    assert answer == tok.decode(ids) and len(ids) > 0
    assert "".join(model.ask_stream("What colour is it?", image=str(picture), max_new_tokens=8)) == answer
    with torch.no_grad():  # the training forward (media encoded inside) equals the generation path's first step
        one = torch.tensor([prompt])
        first = model(one, Media(images=images))[0, -1].argmax().item()
    assert first == ids[0]
    with pytest.raises(InputError, match="more than the 8 accepted"):
        model.ask("?", images=[str(picture)] * 9)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty.png"):
        model.ask("?", image=str(tmp_path / "empty.png"))
    text_only = MMLlama(MMConfig(trunk=model.config.trunk), trunk=model.trunk)
    with pytest.raises(InputError, match="loaded by MMLlama.from_pretrained"):
        text_only.ask("?")
    text_only.source = tmp_path / "ckpt"
    with pytest.raises(InputError, match="no image encoder"):
        text_only.ask("?", image=str(picture))


def test_generation_with_images_batched_equals_alone_and_full_forward():
    """Rows with different prompt lengths, 1, 2 or no images of different tile counts, generated in one batch:
    each equals generating it alone, and every new token is the argmax of a full forward over the sequence so far."""
    from mm_llama.generate import Generator, Sampling

    hf, config = tiny_mllama(seed=3)
    model = ours(hf, config, hf_compat=False)
    g = torch.Generator().manual_seed(4)

    def picture(h, w):
        return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()

    pictures = [[picture(50, 60)], [picture(20, 60), picture(30, 30)], []]  # 4 tiles; 3 and 1 tiles; none
    prompts = [[5, 6, IMG, 7, 8, 9], [IMG, 11, IMG, 12], [13, 14, 15, 16]]
    batch = Images.prepare(pictures, tile_size=TILE, max_tiles=4)
    generator = Generator(model)
    sampling = Sampling(max_new_tokens=10)
    batched = generator.generate(prompts, sampling, media=Media(images=batch))
    for b, prompt in enumerate(prompts):
        alone = Media(images=Images.prepare([pictures[b]], tile_size=TILE, max_tiles=4)) if pictures[b] else None
        assert generator.generate([prompt], sampling, media=alone)[0] == batched[b], b
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                sequence.append(model(torch.tensor([sequence]), alone)[0, -1].argmax().item())
        assert sequence[len(prompt):] == batched[b], b
    assert len({tuple(t) for t in batched}) == 3
