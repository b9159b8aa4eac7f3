"""Image shards (`png`|`jpg` + `json` question/answer and/or `txt` caption) → batches for `image-adapter`.

Each sample becomes one chat about its image, with the loss on the answers only (`mm_llama.data.chat`).

Batch legend: B = batch_size rows, L = the longest row of the batch (≤ seq_len), T = max_tiles, S = tile_size.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

from PIL import Image

from encoders.image_transform import ImageTransform, ImageTransformConfig, collate_images, load_image
from mm_llama.data.chat import IGNORE, Chat, ChatDecode, encode_chat, pad_rows
from mm_llama.data.pipeline import ShardBatches, shard_config_problems
from mm_llama.errors import ConfigError
from mm_llama.tokenizer import Tokenizer

__all__ = ["CAPTION_PROMPT", "IGNORE", "ImageDataConfig", "ImageTextBatches", "decode_image"]

CAPTION_PROMPT = "Describe the image."
_IMAGE_MEMBERS = ("png", "jpg", "jpeg")


@dataclass
class ImageDataConfig:
    """The `data:` section of the image-adapter stage.

    Args:
        shards: a brace pattern, a directory (all its `*.tar`) or a `.txt` shard list (see `expand_shards`).
        tokenizer: path of the tokenizer.model (tiktoken ranks).
        tile_size, max_tiles: the image transform's tiles; must equal the vision encoder's.
        seq_len: most tokens per row; longer dialogs are cut at the end.
        batch_size: rows per batch on each rank.
        shuffle_buffer: samples in the shuffle buffer; 0 keeps file order.
        seed: seeds shard draws, the shuffle buffer and the mixed task's choice; the same config gives the same batches.
        resampled: draw shards with replacement, forever (training); false reads each shard of the rank once.
        num_workers: DataLoader worker processes (0: read in the training process).
        max_skip_fraction: tolerated fraction of bad samples (see `mm_llama.data.skip_counter.SkipCounter`).
        task: "qa" trains on the `json` question/answer, "caption" on the `txt` caption, "mixed" on one of the two per
            sample (seeded by the sample's key; a sample with only one of them uses that one).
    """

    shards: str
    tokenizer: str
    tile_size: int = 560
    max_tiles: int = 4
    seq_len: int = 256
    batch_size: int = 8
    shuffle_buffer: int = 1000
    seed: int = 0
    resampled: bool = True
    num_workers: int = 0
    max_skip_fraction: float = 0.01
    task: Literal["qa", "caption", "mixed"] = "mixed"

    def __post_init__(self) -> None:
        problems = shard_config_problems(self, {"tile_size": 1, "max_tiles": 1, "seq_len": 2, "batch_size": 1,
                                                "shuffle_buffer": 0, "seed": 0, "num_workers": 0})
        if self.task not in ("qa", "caption", "mixed"):
            problems.append(f"data.task must be 'qa', 'caption' or 'mixed', got {self.task!r}")
        if problems:
            raise ConfigError("invalid ImageDataConfig: " + "; ".join(problems))


def decode_image(data: bytes) -> Image.Image:
    """Image bytes → RGB PIL image; `InputError` (or PIL's own errors) when they do not decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image applies its own pixel limit
        return load_image(Image.open(io.BytesIO(data)))


class _Decode(ChatDecode):
    """sample → `Chat` of its image, or `BadSample`."""

    def __init__(self, task: str, seed: int):
        super().__init__(task, seed, kind="image", members=_IMAGE_MEMBERS, check=decode_image,
                         caption_prompt=CAPTION_PROMPT)


class _Row(NamedTuple):
    image: object  # TransformedImage
    tokens: list[int]
    labels: list[int]


class _Prepare:
    """`Chat` → tiles + chat tokens + labels on the answers only."""

    def __init__(self, tokenizer: Tokenizer, transform: ImageTransform, seq_len: int):
        self.tokenizer, self.transform, self.seq_len = tokenizer, transform, seq_len

    def __call__(self, chat: Chat) -> _Row:
        tokens, labels = encode_chat(self.tokenizer, chat.turns, "image", self.seq_len)
        return _Row(self.transform(decode_image(chat.media)), tokens, labels)


class _Collate:
    """Rows → images (one per sample: `Images`), tokens/mask/labels (B, L)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[_Row]) -> dict:
        images = collate_images([[row.image] for row in rows], max_images=1)
        return {"images": images, **pad_rows([(row.tokens, row.labels) for row in rows], self.pad_id)}


class ImageTextBatches:
    """Image + chat-token batches of one data-parallel rank, deterministic and resumable at any batch.

    Args:
        config: the data section.
        rank, world_size: this process among the data-parallel ranks; each rank reads different shards.
    """

    def __init__(self, config: ImageDataConfig, *, rank: int = 0, world_size: int = 1):
        self.config = config
        self.tokenizer = Tokenizer.from_file(config.tokenizer)
        transform = ImageTransform(ImageTransformConfig(tile_size=config.tile_size, max_tiles=config.max_tiles))
        self._source = ShardBatches(config, rank=rank, world_size=world_size, decode=_Decode(config.task, config.seed),
                                    prepare=_Prepare(self.tokenizer, transform, config.seq_len),
                                    collate=_Collate(self.tokenizer.pad_id))
        self.shards = self._source.shards

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from batch `start` on (what a fresh call yields from its `start`-th batch, exactly).

        Args:
            start: index of the first batch; training passes its data position to resume.
        Returns:
            an iterator (endless when `resampled`) of {"images": `Images` (one per sample: pixel_values (B, 1, T,
            3, S, S)), "tokens": long (B, L) right-padded with the pad id, "mask": bool (B, L), "labels": long
            (B, L), the token on the answer and its `<|eot_id|>` and -100 elsewhere, "skipped": bad samples since the
            previous batch, "samples": B}. `DataError` when too many samples are bad.
        """
        return self._source.batches(start)
