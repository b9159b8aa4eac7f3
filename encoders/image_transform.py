"""Llama 3.2 Vision image preprocessing: load, fit to a tile canvas, normalise, split into tiles.

The rule follows Meta's `VariableSizeImageTransform` (llama-models) and is pixel-exact against transformers'
`MllamaImageProcessorPil`:

1. choose a canvas of (h, w) tiles with h * w <= max_tiles: the smallest upscale >= 1 if any canvas can hold the image
   at scale >= 1, else the largest downscale; ties go to the smallest canvas area;
2. resize with PIL bilinear, keeping the aspect ratio, upscaling no further than the tile size;
3. pad bottom/right with black *before* normalisation (padding becomes -mean/std);
4. rescale by 1/255, CLIP mean/std normalisation, row-major split into tiles.

Shapes: T = tile size in pixels, N = max_tiles, B = batch, I = images per sample.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mm_llama.errors import ConfigError, InputError
from mm_llama.paths import local_path

ACCEPTED = ("a path to an image file (str or Path), a PIL.Image, or a uint8 numpy array / torch tensor of shape "
            "(H, W), (H, W, 3) or (H, W, 4)")
# Pillow opens 16-bit greyscale PNG/TIFF as one of these; "I" is what older Pillow produced for the same files.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class ImageTransformConfig:
    """Preprocessing settings; the defaults are Llama 3.2 Vision Instruct's (560-px tiles, up to 4 tiles)."""

    tile_size: int = 560  # 448 for the 11B base model; derive from the checkpoint's positional embedding rows
    max_tiles: int = 4
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP (llama-models image_transform.py)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    max_pixels: int = 178_956_970  # 2 * PIL.Image.MAX_IMAGE_PIXELS, where PIL itself gives up as a decompression bomb

    def __post_init__(self):
        for name in ("tile_size", "max_tiles", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ImageTransformConfig.{name} must be a positive int, got {value!r}")
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ConfigError(f"ImageTransformConfig.{name} must be 3 numbers (R, G, B), got {value!r}")
            setattr(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"ImageTransformConfig.std must be positive, got {self.std!r}")


class TransformedImage(NamedTuple):
    """One preprocessed image.

    tiles: (N, 3, T, T) float32, the real tiles first in row-major order, the rest zeros.
    aspect_ratio: (h, w) tiles of the canvas.
    aspect_ratio_id: 1-based index of `aspect_ratio` in `supported_aspect_ratios(N)` (0 is kept for padding images).
    n_tiles: h * w.
    tile_mask: (N,) bool, True for real tiles.
    """

    tiles: torch.Tensor
    aspect_ratio: tuple[int, int]
    aspect_ratio_id: int
    n_tiles: int
    tile_mask: torch.Tensor


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Every (h, w) tile layout with h * w <= max_tiles, in Llama 3.2's id order.

    Args:
        max_tiles: the largest number of tiles per image (4 for Llama 3.2).

    Returns:
        List of (h, w); for 4: [(1,1),(1,2),(1,3),(1,4),(2,1),(2,2),(3,1),(4,1)]. The checkpoints' aspect-ratio
        embeddings are indexed by position in this list + 1, so the order is part of the weights' contract.
    """
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


def _best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(h, w) tiles of the canvas for an image, by Meta's `get_best_fit` rule (see module docstring)."""
    layouts = supported_aspect_ratios(max_tiles)
    # The image fits a canvas at the scale of its tighter side.
    scales = [min(h * tile / height, w * tile / width) for h, w in layouts]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    # Exact float equality, as Meta and HF compare; on ties the first smallest-area layout wins.
    tied = [layout for layout, s in zip(layouts, scales, strict=True) if s == chosen]
    return min(tied, key=lambda hw: hw[0] * hw[1])


def _fit_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Resized (height, width) inside the canvas, keeping aspect; upscaling stops once a side reaches the tile size."""
    # Each side aims between the tile size and the canvas side: small images grow only to one tile, not to the canvas.
    target_h = min(max(height, tile), canvas_h)
    target_w = min(max(width, tile), canvas_w)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        # `or 1` keeps 1-pixel strips from flooring to 0 (Meta's reference would crash there; HF guards the same way).
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited over white, as transformers' `convert_to_rgb` does."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert clips 16-bit samples at 255 (most of a 16-bit image turns white); scale to 8 bits instead.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _check_pixels(height: int, width: int, max_pixels: int, name: str) -> None:
    if height * width > max_pixels:
        raise InputError(f"image {name} has {width}x{height} = {width * height} pixels, more than the limit of "
                         f"{max_pixels} (ImageTransformConfig.max_pixels); downscale it first")
    if height < 1 or width < 1:
        raise InputError(f"image {name} is empty ({width}x{height} pixels)")


def _open_path(path: Path, max_pixels: int) -> Image.Image:
    name = str(path)
    if not path.is_file():
        raise InputError(f"image file {name} does not exist or is not a file; expected {ACCEPTED}")
    try:
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; our own limit below is the one that decides.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            _check_pixels(image.height, image.width, max_pixels, name)  # from the header, before decoding
            image.load()  # force a full decode now so truncated/corrupt files fail here, not deep in the model
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {name} is too large to decode safely ({e}); limit is {max_pixels} pixels") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{name} is not an image file PIL can read (empty, or not an image); expected {ACCEPTED}") \
            from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {name} is corrupt or truncated and cannot be decoded: {e}") from e
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"{name} has dtype {array.dtype}; expected {ACCEPTED}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        hint = ("; it looks channels-first: move the channels last (e.g. tensor.permute(1, 2, 0))"
                if array.ndim == 3 and array.shape[0] in (1, 3, 4) else "")
        raise InputError(f"{name} has shape {tuple(array.shape)}; expected {ACCEPTED} (channels last){hint}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def load_image(source, max_pixels: int = ImageTransformConfig.max_pixels) -> Image.Image:
    """Load and validate an image, returning it as an 8-bit RGB PIL image with EXIF orientation applied.

    Args:
        source: a path (str or Path), a PIL image, or a uint8 numpy array / torch tensor (H, W), (H, W, 3), (H, W, 4).
            Grey, LA, RGBA, palette, CMYK and 16-bit images become RGB; transparency is composited over white.
        max_pixels: images with more pixels are rejected from the file header, before decoding.

    Returns:
        A decoded `PIL.Image.Image` in mode "RGB".

    Raises:
        InputError: missing, empty, truncated or non-image files, oversized images, wrong array dtype or shape.
    """
    if isinstance(source, (str, Path)):
        image = _open_path(local_path(source, "image"), max_pixels)
        name = str(source)
    elif isinstance(source, Image.Image):
        name = f"PIL.Image ({source.mode}, {source.width}x{source.height})"
        _check_pixels(source.height, source.width, max_pixels, name)
        try:
            source.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{name} cannot be decoded: {e}") from e
        image = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        name = "numpy array" if isinstance(source, np.ndarray) else "torch tensor"
        if isinstance(source, torch.Tensor):
            if source.dtype != torch.uint8:
                raise InputError(f"{name} has dtype {source.dtype}; expected {ACCEPTED}")
            source = source.detach().cpu().numpy()
        if source.ndim in (2, 3):
            _check_pixels(source.shape[0], source.shape[1], max_pixels, name)
        image = _from_array(source, name)
    else:
        raise InputError(f"cannot read an image from {type(source).__name__}; expected {ACCEPTED}")
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {name} cannot be converted to RGB: {e}") from e


class ImageTransform:
    """Llama 3.2 Vision preprocessing as a callable: `ImageTransform(config)(image) -> TransformedImage`."""

    def __init__(self, config: ImageTransformConfig | None = None):
        self.config = config or ImageTransformConfig()
        self.aspect_ratios = supported_aspect_ratios(self.config.max_tiles)
        # float32 like transformers' normalize; (x - mean) / std is then bit-identical to its numpy arithmetic.
        self._mean = torch.tensor(self.config.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.config.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image) -> TransformedImage:
        """Preprocess one image.

        Args:
            image: anything `load_image` accepts.

        Returns:
            TransformedImage with tiles (N, 3, T, T) float32, aspect_ratio (h, w), aspect_ratio_id, n_tiles, tile_mask.
        """
        cfg = self.config
        tile = cfg.tile_size
        image = load_image(image, cfg.max_pixels)
        h_tiles, w_tiles = _best_canvas(image.height, image.width, cfg.max_tiles, tile)
        canvas_h, canvas_w = h_tiles * tile, w_tiles * tile
        new_h, new_w = _fit_size(image.height, image.width, canvas_h, canvas_w, tile)
        resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR))  # (new_h, new_w, 3)

        # Black padding in uint8, before normalisation, so padded pixels end up as -mean/std like Meta's canvas paste.
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = resized
        x = torch.from_numpy(canvas).permute(2, 0, 1)  # (3, H_c, W_c)
        # Rescale in float64 then round to float32, the same order of roundings as transformers' `rescale`.
        x = (x.to(torch.float64) * (1 / 255)).to(torch.float32)
        x = (x - self._mean) / self._std

        n_tiles = h_tiles * w_tiles
        x = x.reshape(3, h_tiles, tile, w_tiles, tile).permute(1, 3, 0, 2, 4)  # (h, w, 3, T, T)
        tiles = torch.zeros(cfg.max_tiles, 3, tile, tile, dtype=torch.float32)
        tiles[:n_tiles] = x.reshape(n_tiles, 3, tile, tile)
        tile_mask = torch.zeros(cfg.max_tiles, dtype=torch.bool)
        tile_mask[:n_tiles] = True
        ar_id = self.aspect_ratios.index((h_tiles, w_tiles)) + 1
        return TransformedImage(tiles, (h_tiles, w_tiles), ar_id, n_tiles, tile_mask)


@dataclass
class Images:
    """The images of a batch, tiled (the image medium's typed input: `mm_llama.media.Media(images=...)`).

    pixel_values: (B, I, N, 3, T, T) float, normalised tiles; padding images and empty tile slots are zeros.
    aspect_ratio_ids: (B, I) long, 0 = padding image.
    tile_mask: (B, I, N) bool, True for the real tiles of real images. Stays on the CPU (`to` leaves it there): the
        masks of the text are built on the host, without waiting for the GPU.
    n_images: images per sample (the rest of the I slots are padding).
    """

    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    tile_mask: torch.Tensor
    n_images: list[int]

    @classmethod
    def prepare(cls, samples: list[list], *, tile_size: int, max_tiles: int, max_images: int | None = None
                ) -> Images:
        """Raw images per sample (paths, PIL images or uint8 arrays, see `ImageTransform`) -> the tiled batch.

        Args:
            samples: B lists of images (a sample may have none).
            tile_size, max_tiles: the image encoder's tiling (`VisionConfig.tile_size` / `max_tiles`).
            max_images: the most images a sample may have (an `InputError` beyond).
        """
        transform = ImageTransform(ImageTransformConfig(tile_size=tile_size, max_tiles=max_tiles))
        if max_images is not None:
            for i, sample in enumerate(samples):
                if len(sample) > max_images:
                    raise InputError(f"sample {i} has {len(sample)} images, more than the {max_images} accepted")
        return collate_images([[transform(image) for image in sample] for sample in samples])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Images:
        """Pixels (in `dtype`, if given) and aspect-ratio ids on `device`; the tile mask stays on the host."""
        return Images(self.pixel_values.to(device, dtype), self.aspect_ratio_ids.to(device), self.tile_mask,
                      list(self.n_images))


def collate_images(batch: list[list[TransformedImage]], max_images: int | None = None) -> Images:
    """Stack per-sample image lists into padded batch tensors.

    Args:
        batch: B lists of TransformedImage (a sample may have none), all with the same tile size and max_tiles.
        max_images: pad every sample to this many images (fixed shapes); None pads to the longest sample.

    Returns:
        The `Images` (padding images are zeros, aspect-ratio id 0, tile mask all False).

    Raises:
        InputError: an empty batch, a sample with more than `max_images` images, or images of different shapes.
    """
    if not batch:
        raise InputError("collate_images got an empty batch; expected a list of per-sample lists of images")
    counts = [len(sample) for sample in batch]
    if max_images is not None:
        for i, n in enumerate(counts):
            if n > max_images:
                raise InputError(f"sample {i} has {n} images, more than max_images={max_images}")
    n_slots = max_images if max_images is not None else max(counts)
    shapes = {tuple(img.tiles.shape) for sample in batch for img in sample}
    if len(shapes) > 1:
        raise InputError(f"images in one batch must share tile size and max_tiles; got tile shapes {sorted(shapes)}")
    max_tiles, _, tile, _ = shapes.pop() if shapes else (1, 3, 1, 1)

    pixel_values = torch.zeros(len(batch), n_slots, max_tiles, 3, tile, tile, dtype=torch.float32)
    aspect_ratio_ids = torch.zeros(len(batch), n_slots, dtype=torch.long)
    tile_mask = torch.zeros(len(batch), n_slots, max_tiles, dtype=torch.bool)
    for b, sample in enumerate(batch):
        for i, img in enumerate(sample):
            pixel_values[b, i] = img.tiles
            aspect_ratio_ids[b, i] = img.aspect_ratio_id
            tile_mask[b, i] = img.tile_mask
    return Images(pixel_values, aspect_ratio_ids, tile_mask, counts)
