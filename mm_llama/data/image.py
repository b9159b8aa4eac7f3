"""Image shards (`png`|`jpg` + `json` question/answer and/or `txt` caption) → batches for `image-adapter`.

Each sample becomes one chat about its image: the image and the first question in the first user turn, then the
sample's follow-up questions, each a turn of its own,

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{follow-up question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{its answer}<|eot_id|> ...

(a caption sample asks "Describe the image." and answers with the caption), and the loss reads only the answers and
their `<|eot_id|>`: `labels` is -100 everywhere else, the `<|image|>` token included (the output head has no row for
it). The `json` member is {"question", "answer"} and may add "follow_ups": [{"question", "answer"}, ...], more
questions about the same image (LLaVA's multi-turn conversations do the same). Why (issue 10): with one question per
image, a batch of 64 held about 2 of the hard "which shape is at <place>" questions; four per image (synth's default)
took the demo's held-out image QA from 85 % to 90 % (shape questions 44 % -> 76 %) at the same steps.

Batch legend: B = batch_size rows, L = the longest row of the batch (≤ seq_len), T = max_tiles, S = tile_size.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from PIL import Image

from encoders.image_transform import ImageTransform, ImageTransformConfig, collate_images, load_image
from mm_llama.data.pipeline import BadSample, ShardBatches, shard_config_problems
from mm_llama.errors import ConfigError, InputError
from mm_llama.tokenizer import Tokenizer

__all__ = ["CAPTION_PROMPT", "IGNORE", "ImageDataConfig", "ImageTextBatches"]

CAPTION_PROMPT = "Describe the image."
IGNORE = -100  # label of positions the loss skips (F.cross_entropy's ignore_index)
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


class _Chat(NamedTuple):
    """A decoded sample: the image file's bytes (checked to decode) and its (question, answer) turns, in order."""

    image: bytes
    turns: tuple[tuple[str, str], ...]


def _open(data: bytes) -> Image.Image:
    """Image bytes → RGB PIL image; `InputError` (or PIL's own errors) when they do not decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image applies its own pixel limit
        return load_image(Image.open(io.BytesIO(data)))


class _Decode:
    """sample → `_Chat`, or `BadSample` (a picklable callable for DataLoader workers)."""

    def __init__(self, task: str, seed: int):
        self.task, self.seed = task, seed

    def __call__(self, sample: dict) -> _Chat:
        key = sample["__key__"]
        members = sorted(k for k in sample if not k.startswith("__"))
        image = next((sample[k] for k in _IMAGE_MEMBERS if k in sample), None)
        if image is None:
            raise BadSample(f"sample {key} has no image member ({'/'.join(_IMAGE_MEMBERS)}; it has {members})")
        try:  # decoded here so that a bad image is counted even when fast-forwarded over
            _open(image)
        except (InputError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadSample(f"sample {key}: the image does not decode ({type(e).__name__}: {e})") from None
        qa = caption = None
        if "json" in sample:
            try:
                record = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadSample(f"sample {key}: 'json' is not UTF-8 JSON ({e})") from None
            qa = _question_turns(record, key)
        if "txt" in sample:
            try:
                caption = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadSample(f"sample {key}: 'txt' is not UTF-8 ({e.reason} at byte {e.start})") from None
            if not caption.strip():
                caption = None
        task = self.task
        if task == "mixed":  # a fixed choice per sample: the same on every pass and after a resume
            both = qa is not None and caption is not None
            task = ("qa" if random.Random(f"{self.seed}/{key}").random() < 0.5 else "caption") if both else (
                "qa" if qa is not None else "caption")
        if task == "qa" and qa is None:
            raise BadSample(f"sample {key} has no 'json' question/answer (it has {members}) for task '{self.task}'")
        if task == "caption" and caption is None:
            raise BadSample(f"sample {key} has no 'txt' caption (it has {members}) for task '{self.task}'")
        return _Chat(image, qa if task == "qa" else ((CAPTION_PROMPT, caption),))


def _question_turns(record: object, key: str) -> tuple[tuple[str, str], ...]:
    """The `json` member's (question, answer) and its follow-ups', checked; `BadSample` naming what is wrong."""
    if not isinstance(record, dict):
        raise BadSample(f"sample {key}: 'json' must be an object with 'question' and 'answer', got "
                        f"{type(record).__name__}")
    follow_ups = record.get("follow_ups", [])
    if not isinstance(follow_ups, list):
        raise BadSample(f"sample {key}: 'follow_ups' must be a list of {{'question', 'answer'}} objects, got "
                        f"{type(follow_ups).__name__}")
    turns = []
    for n, item in enumerate([record, *follow_ups]):
        q, a = (item.get("question"), item.get("answer")) if isinstance(item, dict) else (None, None)
        if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
            where = "'json'" if n == 0 else f"follow_ups[{n - 1}]"
            raise BadSample(f"sample {key}: {where} must hold non-empty strings 'question' and 'answer'")
        turns.append((q, a))
    return tuple(turns)


class _Row(NamedTuple):
    image: object  # TransformedImage
    tokens: list[int]
    labels: list[int]


class _Prepare:
    """`_Chat` → tiles + chat tokens + labels on the answers only."""

    def __init__(self, tokenizer: Tokenizer, transform: ImageTransform, seq_len: int):
        self.tokenizer, self.transform, self.seq_len = tokenizer, transform, seq_len

    def __call__(self, chat: _Chat) -> _Row:
        # Built message by message, as `Tokenizer.encode_dialog(messages, add_generation_prompt=False)` would encode
        # the whole chat, without encoding it again for each turn.
        tok = self.tokenizer
        header = len(tok.encode_header("assistant"))
        tokens, labels = [tok.bos_id], [IGNORE]
        for n, (question, answer) in enumerate(chat.turns):
            # The image opens the first user turn; the question is stripped, as a message's string form is.
            text = {"type": "text", "text": question.strip()}
            user = tok.encode_message("user", [{"type": "image"}, text] if n == 0 else [text])
            reply = tok.encode_message("assistant", answer)  # header, answer, <|eot_id|>
            tokens += user + reply
            labels += [IGNORE] * (len(user) + header) + reply[header:]
            if len(tokens) >= self.seq_len:  # later turns would be cut off anyway
                break
        return _Row(self.transform(_open(chat.image)), tokens[: self.seq_len], labels[: self.seq_len])


class _Collate:
    """Rows → images (one per sample: `Images`), tokens/mask/labels (B, L)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[_Row]) -> dict:
        images = collate_images([[row.image] for row in rows], max_images=1)
        lengths = torch.tensor([len(row.tokens) for row in rows])
        tokens = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)  # (B, L)
        labels = torch.full_like(tokens, IGNORE)  # (B, L)
        for i, row in enumerate(rows):
            tokens[i, : len(row.tokens)] = torch.tensor(row.tokens)
            labels[i, : len(row.labels)] = torch.tensor(row.labels)
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]  # (B, L)
        return {"images": images, "tokens": tokens, "mask": mask, "labels": labels}


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
