"""Image shards (`png`|`jpg` + `txt` caption) → (tiles, caption) batches for contrastive pre-training
(stage `vision-pretrain`, DESIGN §3.3).

The same shards, config (`ImageDataConfig`, with `task: caption`) and shard pipeline as `mm_llama.data.image`:
deterministic, resumable at any batch, bad samples skipped and counted. Captions stay strings: the stage tokenizes
them with its open_clip text tower's tokenizer, so `data.tokenizer` and `data.seq_len` are not read here.

Batch legend: B = batch_size rows, T = max_tiles, S = tile_size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from PIL import Image

from encoders.image_transform import ImageTransform, ImageTransformConfig, collate_images
from mm_llama.data.image import ImageDataConfig, decode_image
from mm_llama.data.pipeline import BadSample, ShardBatches
from mm_llama.errors import ConfigError, InputError

__all__ = ["ImageCaptionBatches"]

_IMAGE_MEMBERS = ("png", "jpg", "jpeg")


class _Pair(NamedTuple):
    image: bytes  # the image file's bytes, checked to decode
    caption: str


def _decode(sample: dict) -> _Pair:
    """sample → `_Pair`, or `BadSample` (a module-level function: picklable for DataLoader workers)."""
    key = sample["__key__"]
    members = sorted(k for k in sample if not k.startswith("__"))
    image = next((sample[k] for k in _IMAGE_MEMBERS if k in sample), None)
    if image is None:
        raise BadSample(f"sample {key} has no image member ({'/'.join(_IMAGE_MEMBERS)}; it has {members})")
    try:  # decoded here, so that a bad image is counted even when fast-forwarded over
        decode_image(image)
    except (InputError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(f"sample {key}: the image does not decode ({type(e).__name__}: {e})") from None
    if "txt" not in sample:
        raise BadSample(f"sample {key} has no 'txt' caption (it has {members})")
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample(f"sample {key}: 'txt' is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not caption:
        raise BadSample(f"sample {key}: the 'txt' caption is empty")
    return _Pair(image, caption)


class _Prepare:
    """`_Pair` → (tiles, caption)."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, pair: _Pair) -> tuple:
        return self.transform(decode_image(pair.image)), pair.caption


def _collate(rows: list[tuple]) -> dict:
    """Rows → images (one per sample: `Images`), captions (B strings)."""
    return {"images": collate_images([[image] for image, _ in rows], max_images=1),
            "captions": [caption for _, caption in rows]}


class ImageCaptionBatches:
    """(tiles, caption) batches of one data-parallel rank, deterministic and resumable at any batch.

    Args:
        config: the data section; `task` must be "caption" (the only thing a contrastive stage can read).
        rank, world_size: this process among the data-parallel ranks; each rank reads different shards.
    """

    def __init__(self, config: ImageDataConfig, *, rank: int = 0, world_size: int = 1):
        if config.task != "caption":
            raise ConfigError(f"contrastive batches pair images with their 'txt' captions: set data.task to "
                              f"'caption' (got {config.task!r})")
        self.config = config
        transform = ImageTransform(ImageTransformConfig(tile_size=config.tile_size, max_tiles=config.max_tiles))
        self._source = ShardBatches(config, rank=rank, world_size=world_size, decode=_decode,
                                    prepare=_Prepare(transform), collate=_collate)
        self.shards = self._source.shards

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from batch `start` on (what a fresh call yields from its `start`-th batch, exactly).

        Returns:
            an iterator (endless when `resampled`) of {"images": `Images` (one per sample: pixel_values (B, 1, T,
            3, S, S)), "captions": list of B str, "skipped": bad samples since the previous batch, "samples": B}.
            `DataError` when too many samples are bad.
        """
        return self._source.batches(start)
