"""Video shards (`mp4` + `json` question/answer and/or `txt` description) → batches for `video-adapter`.

Each sample becomes one chat about its clip, `<|video|>` opening the first user turn, with the loss on the answers
only (`mm_llama.data.chat`). A clip's frames are sampled as `encoders.video.read_video` samples a file at inference
(the same frames: uniformly in time, `n_frames` of them, repeated for shorter clips) and tiled as images; decoded
here in the data loader's own process, from the sample's bytes. Our shards are our own generated clips: untrusted
files go through `read_video`, whose decoder runs in a process of its own with a timeout.

Batch legend: B = batch_size rows, L = the longest row of the batch (≤ seq_len), F = n_frames, N = max_tiles,
T = tile_size.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from encoders.image_transform import ImageTransform, ImageTransformConfig
from encoders.video import collate_videos, decode_size, uniform_indices, uniform_indices_by_time, usable_timestamps
from mm_llama.data.chat import Chat, ChatDecode, encode_chat, pad_rows
from mm_llama.data.image import ImageDataConfig
from mm_llama.data.pipeline import ShardBatches
from mm_llama.errors import ConfigError, InputError
from mm_llama.tokenizer import Tokenizer

__all__ = ["CAPTION_PROMPT", "VideoDataConfig", "VideoTextBatches", "clip_frames"]

CAPTION_PROMPT = "Describe the video."
_VIDEO_MEMBERS = ("mp4", "webm", "mkv", "avi", "mov")


@dataclass
class VideoDataConfig(ImageDataConfig):
    """The `data:` section of the video-adapter stage: `ImageDataConfig`'s fields (frames are tiled as images), and

    Args:
        n_frames: frames sampled per clip; must equal the video adapter's `n_frames`.
        shuffle_buffer: samples (their compressed bytes) in the shuffle buffer.
    """

    n_frames: int = 16
    shuffle_buffer: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_frames, int) or isinstance(self.n_frames, bool) or self.n_frames < 1:
            raise ConfigError(f"invalid VideoDataConfig: data.n_frames must be a positive integer, got "
                              f"{self.n_frames!r}")


def clip_frames(data: bytes, n_frames: int, tile_size: int, max_tiles: int) -> np.ndarray:
    """A clip's bytes → its `n_frames` sampled frames (F, H, W, 3) uint8 at the tiler's size, decoded in this process.

    The frames `read_video` reads from the same file (same sampling rule, same size); `InputError` (or decord's
    own error) when the bytes do not decode.
    """
    import decord

    probe = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    if len(probe) == 0:
        raise InputError("the clip has no frames")
    height, width = probe[0].shape[:2]
    out_h, out_w = decode_size(height, width, tile_size, max_tiles)
    reader = probe if (out_h, out_w) == (height, width) else decord.VideoReader(
        io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, width=out_w, height=out_h)
    n = len(reader)
    times = reader.get_frame_timestamp(list(range(n)))
    indices = uniform_indices_by_time(times, n_frames) if usable_timestamps(times) else uniform_indices(n, n_frames)
    unique, inverse = np.unique(indices, return_inverse=True)
    return reader.get_batch(unique.tolist()).asnumpy()[inverse]  # (F, H, W, 3)


class _Check:
    """Whether a clip decodes to `n_frames` frames (the samples' `check`; picklable for DataLoader workers)."""

    def __init__(self, n_frames: int, tile_size: int, max_tiles: int):
        self.args = (n_frames, tile_size, max_tiles)

    def __call__(self, data: bytes) -> None:
        clip_frames(data, *self.args)


class _Row(NamedTuple):
    frames: list  # F TransformedImages
    tokens: list[int]
    labels: list[int]


class _Prepare:
    """`Chat` → the clip's tiled frames + chat tokens + labels on the answers only."""

    def __init__(self, tokenizer: Tokenizer, transform: ImageTransform, n_frames: int, seq_len: int):
        self.tokenizer, self.transform, self.n_frames, self.seq_len = tokenizer, transform, n_frames, seq_len

    def __call__(self, chat: Chat) -> _Row:
        config = self.transform.config
        frames = clip_frames(chat.media, self.n_frames, config.tile_size, config.max_tiles)
        tokens, labels = encode_chat(self.tokenizer, chat.turns, "video", self.seq_len)
        return _Row([self.transform(frame) for frame in frames], tokens, labels)


class _Collate:
    """Rows → clips (one per sample: `Videos`), tokens/mask/labels (B, L)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[_Row]) -> dict:
        videos = collate_videos([[row.frames] for row in rows], max_videos=1)
        return {"videos": videos, **pad_rows([(row.tokens, row.labels) for row in rows], self.pad_id)}


class VideoTextBatches:
    """Clip + chat-token batches of one data-parallel rank, deterministic and resumable at any batch.

    Args:
        config: the data section.
        rank, world_size: this process among the data-parallel ranks; each rank reads different shards.
    """

    def __init__(self, config: VideoDataConfig, *, rank: int = 0, world_size: int = 1):
        self.config = config
        self.tokenizer = Tokenizer.from_file(config.tokenizer)
        transform = ImageTransform(ImageTransformConfig(tile_size=config.tile_size, max_tiles=config.max_tiles))
        decode = ChatDecode(config.task, config.seed, kind="video", members=_VIDEO_MEMBERS,
                            check=_Check(config.n_frames, config.tile_size, config.max_tiles),
                            caption_prompt=CAPTION_PROMPT)
        self._source = ShardBatches(config, rank=rank, world_size=world_size, decode=decode,
                                    prepare=_Prepare(self.tokenizer, transform, config.n_frames, config.seq_len),
                                    collate=_Collate(self.tokenizer.pad_id))
        self.shards = self._source.shards

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from batch `start` on (what a fresh call yields from its `start`-th batch, exactly).

        Returns:
            an iterator (endless when `resampled`) of {"videos": `Videos` (one per sample: pixel_values (B, 1, F,
            N, 3, T, T)), "tokens": long (B, L) right-padded with the pad id, "mask": bool (B, L), "labels": long
            (B, L), the token on the answer and its `<|eot_id|>` and -100 elsewhere, "skipped": bad samples since
            the previous batch, "samples": B}. `DataError` when too many samples are bad.
        """
        return self._source.batches(start)
