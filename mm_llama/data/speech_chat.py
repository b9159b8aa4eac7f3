"""Speech shards (`flac` | `wav` + `json`, maybe `txt` and a picture) → batches for the `speech-adapter` stage.

Each sample is one chat whose user turn is the utterance, with the loss on the target only (paper §8.3.2, DESIGN §3.7):

    asr       system "Repeat after me in {language}:"                 target: the transcript (`txt`, or json "target")
    ast       system "Translate the following sentence into {language}:"   target: json "target"
    dialogue  no system prompt; a picture (`png`/`jpg`), if any, opens the user turn   target: json "answer"

    <|begin_of_text|>[<|start_header_id|>system<|end_header_id|>\\n\\n{prompt}<|eot_id|>]
    <|start_header_id|>user<|end_header_id|>\\n\\n[<|image|>]<|speech_start|><|speech|> × P<|speech_end|><|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{target}<|eot_id|>

The json is {"task": "asr" | "ast" | "dialogue", "language": str (asr, ast), "target" | "answer": str}, as
`mm-llama data synth --kind speech` writes it. P = the utterance's positions (`adapters.speech.speech_positions`). An
utterance longer than `max_seconds` is a bad sample (its target is the whole utterance's: it cannot be cropped).

Batch legend: B rows, L the longest row, N = B utterances, T their longest mel frames.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from adapters.speech import SpeechAdapterConfig, speech_positions
from encoders.audio import HOP, SAMPLE_RATE, load_audio
from encoders.image_transform import ImageTransform, ImageTransformConfig, collate_images
from encoders.utterances import Utterances
from mm_llama.data.chat import IGNORE, pad_rows
from mm_llama.data.image import decode_image
from mm_llama.data.pipeline import BadSample, ShardBatches, shard_config_problems
from mm_llama.data.speech import decode_audio
from mm_llama.errors import ConfigError, InputError
from mm_llama.speech_prompts import SYSTEM_PROMPTS, system_prompt
from mm_llama.tokenizer import Tokenizer

__all__ = ["TASKS", "SpeechChatBatches", "SpeechChatDataConfig", "speech_chat"]

TASKS = tuple(SYSTEM_PROMPTS)
_AUDIO_MEMBERS = ("flac", "wav")
_IMAGE_MEMBERS = ("png", "jpg", "jpeg")


@dataclass
class SpeechChatDataConfig:
    """The `data:` section of the speech-adapter stage.

    Args:
        shards: a brace pattern, a directory (all its `*.tar`) or a `.txt` shard list (see `expand_shards`).
        tokenizer: path of the tokenizer.model.
        max_seconds: longer utterances are bad samples; at most the adapter's `max_seconds`.
        seq_len: most tokens per row; a row longer than this is a bad sample (a target cannot be cut).
        tile_size, max_tiles: the pictures of dialogue samples, as the model's image encoder tiles them.
        batch_size, shuffle_buffer, seed, resampled, num_workers, max_skip_fraction: as every shard-reading stage's.
    """

    shards: str
    tokenizer: str
    max_seconds: float = 60.0
    seq_len: int = 1024
    tile_size: int = 560
    max_tiles: int = 4
    batch_size: int = 8
    shuffle_buffer: int = 1000
    seed: int = 0
    resampled: bool = True
    num_workers: int = 0
    max_skip_fraction: float = 0.01

    def __post_init__(self) -> None:
        problems = shard_config_problems(self, {"seq_len": 2, "tile_size": 1, "max_tiles": 1, "batch_size": 1,
                                                "shuffle_buffer": 0, "seed": 0, "num_workers": 0})
        if isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, int | float) or not (
                0 < self.max_seconds < math.inf):
            problems.append(f"data.max_seconds must be a number > 0, got {self.max_seconds!r}")
        if problems:
            raise ConfigError("invalid SpeechChatDataConfig: " + "; ".join(problems))


class SpeechChat(NamedTuple):
    """A decoded sample: the audio and picture bytes (picture None), the chat's tokens and labels."""

    audio: bytes
    n_samples: int  # at 16 kHz: what the chat's positions count
    image: bytes | None
    tokens: list[int]
    labels: list[int]


def speech_chat(record: object, transcript: str | None, key: str) -> tuple[str, str | None, str]:
    """A sample's (task, system prompt, target) from its json `record` and `txt`; `BadSample` naming what is
    wrong."""
    if not isinstance(record, dict) or record.get("task") not in TASKS:
        got = record.get("task") if isinstance(record, dict) else type(record).__name__
        raise BadSample(f"sample {key}: json 'task' must be one of {list(TASKS)}, got {got!r}")
    task = record["task"]
    target = record.get("target", transcript if task == "asr" else record.get("answer"))
    if not isinstance(target, str) or not target.strip():
        needs = {"asr": "a 'txt' transcript or json 'target'", "ast": "json 'target'", "dialogue": "json 'answer'"}
        raise BadSample(f"sample {key}: task {task} needs {needs[task]} (non-empty text)")
    system = None
    if SYSTEM_PROMPTS[task] is not None:
        language = record.get("language")
        if not isinstance(language, str) or not language.strip():
            raise BadSample(f"sample {key}: task {task} needs json 'language' (e.g. 'English')")
        system = system_prompt(task, language.strip())
    return task, system, target.strip()


class _Decode:
    """sample → `SpeechChat`, or `BadSample` naming what is wrong (picklable for DataLoader workers). The chat is
    tokenized here: a row over `seq_len` is a bad sample, never a cut target."""

    def __init__(self, tokenizer: Tokenizer, adapter: SpeechAdapterConfig, stack: int, max_seconds: float,
                 seq_len: int):
        self.tokenizer, self.adapter, self.stack = tokenizer, adapter, stack
        self.max_seconds, self.seq_len = max_seconds, seq_len

    def __call__(self, sample: dict) -> SpeechChat:
        key = sample["__key__"]
        members = sorted(k for k in sample if not k.startswith("__"))
        audio = next((sample[m] for m in _AUDIO_MEMBERS if m in sample), None)
        if audio is None or "json" not in sample:
            raise BadSample(f"sample {key} needs an audio member ({'/'.join(_AUDIO_MEMBERS)}) and 'json'; it has "
                            f"{members}")
        try:
            record = json.loads(sample["json"].decode("utf-8"))
            transcript = sample["txt"].decode("utf-8") if "txt" in sample else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadSample(f"sample {key}: 'json' or 'txt' is not UTF-8 text/JSON ({e})") from None
        _, system, target = speech_chat(record, transcript, key)
        try:  # decoded here, so that a bad file is counted even when fast-forwarded over
            samples, rate = decode_audio(audio, f"sample {key}'s audio")
            wave = load_audio((samples, rate), sample_rate=rate)
        except InputError as e:
            raise BadSample(str(e)) from None
        if len(wave) > self.max_seconds * rate:
            raise BadSample(f"sample {key} is {len(wave) / rate:.1f} s long, over data.max_seconds "
                            f"({self.max_seconds:g} s)")
        n_16k = math.ceil(len(wave) * SAMPLE_RATE / rate)  # torchaudio's resampled length
        if n_16k < HOP + 1:
            raise BadSample(f"sample {key} is shorter than 10 ms")
        image = next((sample[m] for m in _IMAGE_MEMBERS if m in sample), None)
        if image is not None:
            try:
                decode_image(image)
            except Exception as e:  # noqa: BLE001 - whatever PIL raises, the sample is unusable; it is counted
                raise BadSample(f"sample {key}: the picture does not decode ({type(e).__name__}: {e})") from None
        tokens, labels = self._chat(n_16k, image is not None, system, target)
        if len(tokens) > self.seq_len:
            raise BadSample(f"sample {key}: its chat is {len(tokens)} tokens, over data.seq_len ({self.seq_len})")
        return SpeechChat(audio, n_16k, image, tokens, labels)

    def _chat(self, n_samples: int, image: bool, system: str | None, target: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        positions = int(speech_positions(torch.tensor(n_samples // HOP), self.stack, self.adapter))
        content = [{"type": "image"}] * image + [{"type": "speech", "positions": positions}]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        prompt = tok.encode_dialog(messages)  # ends with the assistant header
        reply = tok.encode(target, bos=False, eos=False) + [tok.eot_id]
        return prompt + reply, [IGNORE] * len(prompt) + reply


class _Row(NamedTuple):
    wave: torch.Tensor
    image: object | None  # TransformedImage
    tokens: list[int]
    labels: list[int]


class _Prepare:
    """`SpeechChat` → the 16 kHz waveform (its positions as the chat counted them) and the tiled picture."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, chat: SpeechChat) -> _Row:
        wave = load_audio(decode_audio(chat.audio, "audio"))
        wave = torch.nn.functional.pad(wave, (0, max(0, chat.n_samples - len(wave))))[: chat.n_samples]  # exact
        image = self.transform(decode_image(chat.image)) if chat.image is not None else None
        return _Row(wave, image, chat.tokens, chat.labels)


class _Collate:
    """Rows → utterances, pictures (None when no row has one), tokens/mask/labels (B, L)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[_Row]) -> dict:
        images = None
        if any(row.image is not None for row in rows):
            images = collate_images([[row.image] if row.image is not None else [] for row in rows], max_images=1)
        return {"speech": Utterances.from_waves([row.wave for row in rows]), "images": images,
                **pad_rows([(row.tokens, row.labels) for row in rows], self.pad_id)}


class SpeechChatBatches:
    """Utterance + chat-token batches of one data-parallel rank, deterministic and resumable at any batch.

    Args:
        config: the data section.
        adapter, stack: the speech adapter's config and the encoder's frame stacking (they set each utterance's
            positions).
        rank, world_size: this process among the data-parallel ranks; each rank reads different shards.
    """

    def __init__(self, config: SpeechChatDataConfig, adapter: SpeechAdapterConfig, stack: int, *, rank: int = 0,
                 world_size: int = 1):
        self.config = config
        self.tokenizer = Tokenizer.from_file(config.tokenizer)
        transform = ImageTransform(ImageTransformConfig(tile_size=config.tile_size, max_tiles=config.max_tiles))
        decode = _Decode(self.tokenizer, adapter, stack, config.max_seconds, config.seq_len)
        self._source = ShardBatches(config, rank=rank, world_size=world_size, decode=decode,
                                    prepare=_Prepare(transform), collate=_Collate(self.tokenizer.pad_id))
        self.shards = self._source.shards

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from batch `start` on: {"speech": `Utterances` (N = B), "images": `Images` or None, "tokens",
        "mask", "labels": (B, L) as the image stage's, "skipped", "samples"}."""
        return self._source.batches(start)
