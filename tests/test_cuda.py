"""The compiled generation path (CUDA graphs for the decode step, symbolic-length prefill, compiled image encoder)
against the eager one, on a GPU. CI has no GPU: these run on the device machine (`pytest tests/test_cuda.py`)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_compiled_generation_equals_eager_with_images_and_taps():
    from test_mllama_parity import IMG, TILE, ours, tiny_mllama

    from encoders.image_transform import Images
    from mm_llama.generate import Generator, Sampling

    hf, config = tiny_mllama(seed=3)
    model = ours(hf, config, hf_compat=False).cuda()
    g = torch.Generator().manual_seed(4)
    pictures = [[torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8, generator=g).numpy()], []]
    prompts = [[5, 6, IMG, 7, 8, 9], [13, 14, 15, 16]]
    from mm_llama.media import Media

    media = Media(images=Images.prepare(pictures, tile_size=TILE, max_tiles=4))
    sampling = Sampling(max_new_tokens=12)
    eager = list(Generator(model).stream_steps(prompts, sampling, media=media, taps=(1, 4)))
    compiled = Generator(model, compile=True)
    for _ in range(2):  # the second call replays the recorded graphs with the media state copied in place
        steps = list(compiled.stream_steps(prompts, sampling, media=media, taps=(1, 4)))
        assert [s.tokens for s in steps] == [s.tokens for s in eager]
        for a, b in zip(steps, eager, strict=True):
            for x, y in zip(a.taps, b.taps, strict=True):
                assert (x - y).abs().max() <= 1e-4 * y.abs().max()
    assert len({tuple(s.tokens) for s in eager}) > 1
    # A text-only request through the same compiled generator, then the image one again.
    text = compiled.generate([[1, 2, 3]], sampling)
    assert text == Generator(model).generate([[1, 2, 3]], sampling)
    assert [s.tokens for s in compiled.stream_steps(prompts, sampling, media=media)] == [s.tokens for s in eager]


def test_compiled_assistant_hears_as_the_eager_one():
    # `compile=True` compiles the speech encoder and adapter with the vision encoder (`MMLlama.encoders`): spoken
    # questions of two lengths (the second recompiles with a symbolic length) answer as eagerly, token for token.
    import numpy as np

    from mm_llama.api import Assistant

    eager = Assistant.from_pretrained("demo", dtype=torch.float32, device="cuda")
    compiled = Assistant.from_pretrained("demo", dtype=torch.float32, device="cuda", compile=True)
    assert set(compiled.model.encoders()) == {"vision", "speech_encoder", "speech_adapter"}
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
    for seconds in (2.1, 3.4, 2.1):
        wave = (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)
        expected = eager.ask(audio=(wave, 16_000), image=picture, max_new_tokens=12)
        assert compiled.ask(audio=(wave, 16_000), image=picture, max_new_tokens=12) == expected
        assert eager.transcribe((wave, 16_000)) == compiled.transcribe((wave, 16_000))
