"""Llama 3.2 image preprocessing: pixel-exact against transformers' MllamaImageProcessorPil; input kinds; bad input."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.image_transform import (
    Images,
    ImageTransform,
    ImageTransformConfig,
    collate_images,
    load_image,
    supported_aspect_ratios,
)
from mm_llama.errors import ConfigError, InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def noise_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    # Random pixels: every bilinear weight shows up in the output, so an off-by-one in the resize would be caught.
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, mode="RGB").convert(mode)


def hf_processor(tile: int):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4,
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def hf_transform(image: Image.Image, tile: int) -> dict:
    out = hf_processor(tile)(images=[[image]], return_tensors="np")
    return {"pixel_values": torch.from_numpy(out["pixel_values"][0, 0]),
            "aspect_ratio_id": int(out["aspect_ratio_ids"][0, 0]),
            "aspect_ratio_mask": torch.from_numpy(out["aspect_ratio_mask"][0, 0]).bool(),
            "num_tiles": out["num_tiles"][0][0]}


def test_supported_aspect_ratios():
    assert supported_aspect_ratios(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert supported_aspect_ratios(1) == [(1, 1)]
    assert len(supported_aspect_ratios(6)) == 14  # 6 + 3 + 2 + 1 + 1 + 1


def test_config_validation():
    with pytest.raises(ConfigError, match="tile_size"):
        ImageTransformConfig(tile_size=0)
    with pytest.raises(ConfigError, match="mean"):
        ImageTransformConfig(mean=(0.5, 0.5))
    with pytest.raises(ConfigError, match="std"):
        ImageTransformConfig(std=(0.5, 0.0, 0.5))


# (height, width, tile): tiny, 1-px strips, portrait, landscape, square, larger than 4 tiles, exactly one/two tiles.
PARITY_CASES = [
    (3, 5, 560), (1, 1000, 560), (1000, 1, 560), (700, 400, 560), (400, 700, 560), (600, 600, 560),
    (3000, 2000, 560), (560, 560, 560), (560, 1120, 560), (1, 5000, 560),
    (3, 5, 448), (300, 900, 448), (448, 448, 448), (2000, 3000, 448),
    (3, 5, 28), (1, 100, 28), (50, 20, 28), (28, 28, 28), (57, 56, 28), (200, 113, 28), (30, 120, 28),
]


@pytest.mark.parametrize("height,width,tile", PARITY_CASES)
def test_pixel_exact_against_transformers(height, width, tile):
    image = noise_image(height, width, seed=height * 7 + width)
    ours = ImageTransform(ImageTransformConfig(tile_size=tile))(image)
    ref = hf_transform(image, tile)
    assert ours.tiles.shape == (4, 3, tile, tile) and ours.tiles.dtype == torch.float32
    assert (ours.tiles - ref["pixel_values"]).abs().max().item() == 0.0
    assert ours.aspect_ratio_id == ref["aspect_ratio_id"]
    assert ours.n_tiles == ref["num_tiles"] == ours.aspect_ratio[0] * ours.aspect_ratio[1]
    # HF's mask marks tile 0 of every image; for a real image that agrees with ours tile for tile.
    assert torch.equal(ours.tile_mask, ref["aspect_ratio_mask"])


def test_canvas_choice_and_padding_values():
    t = ImageTransform(ImageTransformConfig(tile_size=28))
    # 20x50 (W x H): (2, 1) = 28x56 is the smallest upscale (1.12). Upscaling targets a side between the tile and the
    # canvas, here height 50 -> 50 (already >= 28), so the image keeps its size and is padded, not stretched.
    out = t(noise_image(50, 20))
    assert out.aspect_ratio == (2, 1) and out.aspect_ratio_id == 5 and out.n_tiles == 2
    assert out.tile_mask.tolist() == [True, True, False, False]
    assert out.tiles[2:].abs().max().item() == 0.0  # empty tile slots are zeros after normalisation
    # Black padding right of column 20 and below row 50 (row 22 of tile 1) becomes -mean/std after normalisation.
    pad = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).float().view(3, 1, 1)
    assert torch.allclose(out.tiles[0, :, :, 20:], pad.expand(3, 28, 8), atol=1e-6)
    assert torch.allclose(out.tiles[1, :, 22:, :], pad.expand(3, 6, 28), atol=1e-6)
    assert (out.tiles[0, :, :, 19] - pad[:, :, 0]).abs().max() > 0.1  # column 19 is image, not padding
    # 15x10 (tile 1 = 28): upscaling to the tile: scale min(28/15, 28/10) -> 28x18 (W x H), one tile.
    small = t(noise_image(10, 15))
    assert small.aspect_ratio == (1, 1) and torch.allclose(small.tiles[0, :, 18:, :], pad.expand(3, 10, 28), atol=1e-6)
    # Larger than four tiles both ways: the largest downscale, 2x2 (scale 56/150) beats 3x1/1x3 (28/150, 28/100).
    assert t(noise_image(150, 100)).aspect_ratio == (2, 2)


def _write_formats(tmp_path, image: Image.Image):
    png, jpg = tmp_path / "img.png", tmp_path / "img.jpg"
    image.save(png)
    image.save(jpg, quality=90)
    return png, jpg


def test_input_kinds_give_identical_tensors(tmp_path):
    image = noise_image(90, 130, seed=3)
    png, jpg = _write_formats(tmp_path, image)
    t = ImageTransform(ImageTransformConfig(tile_size=56))
    reference = t(image).tiles
    array = np.asarray(image)
    for source in (png, str(png), array, torch.from_numpy(array.copy())):
        assert torch.equal(t(source).tiles, reference)
    # JPEG is lossy: compare the path with the same decoded file passed as a PIL image.
    assert torch.equal(t(jpg).tiles, t(Image.open(jpg)).tiles)
    # Grey (H, W) and RGBA (H, W, 4) arrays equal the PIL images of the same modes.
    grey = np.asarray(image.convert("L"))
    assert torch.equal(t(grey).tiles, t(image.convert("L")).tiles)
    assert torch.equal(t(torch.from_numpy(grey.copy())).tiles, t(image.convert("L")).tiles)
    rgba = np.dstack([array, np.full(array.shape[:2], 128, np.uint8)])
    assert torch.equal(t(rgba).tiles, t(Image.fromarray(rgba, mode="RGBA")).tiles)


def _mode_images() -> dict[str, Image.Image]:
    base = noise_image(40, 30, seed=5)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(0, 240, 8, dtype=np.uint8), (40, 1))))
    palette_t = base.convert("P")
    palette_t.info["transparency"] = 0
    return {"L": base.convert("L"), "LA": rgba.convert("LA"), "RGBA": rgba, "P": base.convert("P"),
            "P+transparency": palette_t, "CMYK": base.convert("CMYK")}


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK"])
def test_mode_conversions_match_transformers(mode):
    image = _mode_images()[mode]
    ours = ImageTransform(ImageTransformConfig(tile_size=28))(image)
    ref = hf_transform(image, 28)
    assert (ours.tiles - ref["pixel_values"]).abs().max().item() == 0.0
    rgb = np.asarray(load_image(image))
    assert rgb.shape == (40, 30, 3) and rgb.dtype == np.uint8
    if mode == "RGBA":
        # Composited over white like HF's convert_to_rgb: alpha 0 in column 0 gives pure white.
        assert rgb[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)  # 0 … 55000
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path))
    expected = np.rint(values / 257).astype(np.uint8)  # 40000 -> 156; PIL's convert("RGB") (and HF) clip it to 255
    assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))
    assert rgb[2, 0].tolist() == [156, 156, 156]
    assert np.array_equal(np.asarray(load_image(Image.fromarray(values.astype(np.int32), mode="I"))), rgb)


def test_exif_orientation_is_applied(tmp_path):
    image = noise_image(20, 40, seed=9)  # W=40, H=20
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    # Rebuilt from the array so it carries no EXIF (PIL's transpose keeps the tag, which would rotate it again).
    upright = Image.fromarray(np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270).convert("RGB")))
    assert np.array_equal(np.asarray(loaded), np.asarray(upright))
    t = ImageTransform(ImageTransformConfig(tile_size=28))
    assert t(path).aspect_ratio == (2, 1)  # portrait after rotation
    assert torch.equal(t(path).tiles, t(upright).tiles)


def _huge_png(path):
    small = path.with_suffix(".small.png")
    noise_image(4, 4).save(small)
    buf = bytearray(small.read_bytes())
    assert buf[12:16] == b"IHDR"
    buf[16:24] = struct.pack(">II", 20000, 20000)
    buf[29:33] = struct.pack(">I", zlib.crc32(bytes(buf[12:29])))
    path.write_bytes(bytes(buf))
    return path


def test_bad_files_raise_input_error_naming_the_path(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    noise_image(200, 200).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    missing = tmp_path / "missing.png"
    for path, words in [(empty, "not an image"), (truncated, "truncated"), (text, "not an image"),
                        (missing, "does not exist")]:
        with pytest.raises(InputError, match=words) as info:
            ImageTransform()(path)
        assert str(path) in str(info.value)


def test_oversized_header_rejected_before_decoding(tmp_path):
    path = _huge_png(tmp_path / "bomb.png")
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert str(path) in message and "400000000" in message and "178956970" in message
    # A lower limit of our own applies the same way, and PIL's own bomb error also becomes an InputError.
    with pytest.raises(InputError, match="more than the limit of 15"):
        load_image(_write_formats(tmp_path, noise_image(4, 4))[0], max_pixels=15)
    with pytest.raises(InputError, match="too large"):
        load_image(path, max_pixels=10**9)


def test_bad_arrays_and_types():
    with pytest.raises(InputError, match="float32"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(InputError, match="torch.float32"):
        load_image(torch.zeros(4, 4, 3))
    with pytest.raises(InputError, match=r"\(3, 8, 8\)"):
        load_image(np.zeros((3, 8, 8), dtype=np.uint8))  # channels-first is not accepted
    with pytest.raises(InputError, match=r"\(2, 8, 8, 3\)"):
        load_image(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="list"):
        load_image([1, 2, 3])


def test_collate_images():
    t = ImageTransform(ImageTransformConfig(tile_size=28))
    a, b, c = t(noise_image(28, 28)), t(noise_image(20, 50)), t(noise_image(50, 20))
    batch = collate_images([[a, b], [c]])
    assert batch.pixel_values.shape == (2, 2, 4, 3, 28, 28)
    assert batch.aspect_ratio_ids.tolist() == [[1, 2], [5, 0]]
    assert batch.aspect_ratio_ids.dtype == torch.long
    assert batch.tile_mask.tolist() == [[[True, False, False, False], [True, True, False, False]],
                                        [[True, True, False, False], [False] * 4]]
    assert batch.n_images == [2, 1]
    assert torch.equal(batch.pixel_values[0, 1], b.tiles)
    assert batch.pixel_values[1, 1].abs().max().item() == 0.0
    moved = batch.to("cpu", torch.float64)
    assert moved.pixel_values.dtype == torch.float64 and moved.tile_mask is batch.tile_mask  # the mask stays put
    padded = collate_images([[a, b], [c]], max_images=3)
    assert padded.pixel_values.shape == (2, 3, 4, 3, 28, 28) and padded.aspect_ratio_ids[:, 2].tolist() == [0, 0]
    with pytest.raises(InputError, match="sample 0 has 2 images, more than max_images=1"):
        collate_images([[a, b], [c]], max_images=1)
    prepared = Images.prepare([[noise_image(28, 28), noise_image(20, 50)], [noise_image(50, 20)]], tile_size=28,
                              max_tiles=4)
    assert torch.equal(prepared.pixel_values, batch.pixel_values) and prepared.n_images == [2, 1]
    with pytest.raises(InputError, match="sample 0 has 2 images, more than the 1 accepted"):
        Images.prepare([[noise_image(28, 28)] * 2], tile_size=28, max_tiles=4, max_images=1)
    with pytest.raises(InputError, match="tile"):
        collate_images([[a], [ImageTransform(ImageTransformConfig(tile_size=56))(noise_image(5, 5))]])
