"""Text shards → padded token batches for the `lm` stage.

A sample is either plain text, a `txt` member, encoded as `<|begin_of_text|>` + text + `<|end_of_text|>`; or a chat
dialogue, a `json` member {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]},
encoded in the chat format (`Tokenizer.encode_dialog`, no generation prompt). The loss reads every token of both.

Batch legend: B = batch_size rows, L = the longest row of the batch (≤ seq_len).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mm_llama.data.pipeline import BadSample, ShardBatches, shard_config_problems
from mm_llama.errors import ConfigError
from mm_llama.tokenizer import ROLES, Tokenizer

__all__ = ["TextBatches", "TextDataConfig", "decode_text"]


@dataclass
class TextDataConfig:
    """The `data:` section of a text stage.

    Args:
        shards: a brace pattern (`data/text-{000000..000003}.tar`), a directory (all its `*.tar`, sorted) or a `.txt`
            file listing one shard per line.
        tokenizer: path of the tokenizer.model (tiktoken ranks).
        seq_len: most tokens per row, `<|begin_of_text|>` and `<|end_of_text|>` included; longer documents are cut.
        batch_size: rows per batch on each rank.
        shuffle_buffer: samples in the shuffle buffer; 0 keeps file order.
        seed: seeds shard draws and the shuffle buffer; the same config always gives the same batches.
        resampled: draw shards with replacement, forever (training); false reads each shard of the rank once.
        num_workers: DataLoader worker processes (0: read in the training process).
        max_skip_fraction: tolerated fraction of bad samples (see `mm_llama.data.skip_counter.SkipCounter`).
    """

    shards: str
    tokenizer: str
    seq_len: int = 256
    batch_size: int = 8
    shuffle_buffer: int = 1000
    seed: int = 0
    resampled: bool = True
    num_workers: int = 0
    max_skip_fraction: float = 0.01

    def __post_init__(self) -> None:
        problems = shard_config_problems(self, {"seq_len": 2, "batch_size": 1, "shuffle_buffer": 0, "seed": 0,
                                                "num_workers": 0})
        if problems:  # seq_len >= 2 leaves room for <|begin_of_text|> and <|end_of_text|>
            raise ConfigError("invalid TextDataConfig: " + "; ".join(problems))


_ACCEPTED = 'a \'txt\' member (UTF-8 text) or a \'json\' member {"messages": [{"role": ..., "content": "..."}, ...]}'


def _messages(key: str, data: bytes) -> list[dict[str, str]]:
    """The `json` member's messages, checked; `BadSample` naming what is wrong."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(f"sample {key}: 'json' is not UTF-8 JSON ({e}); a text sample holds {_ACCEPTED}") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadSample(f"sample {key}: 'json' must be an object with a non-empty list 'messages'; a text sample "
                        f"holds {_ACCEPTED}")
    for n, msg in enumerate(messages):
        if not (isinstance(msg, dict) and msg.keys() == {"role", "content"} and msg["role"] in ROLES
                and isinstance(msg["content"], str) and msg["content"].strip()):
            raise BadSample(f"sample {key}: message {n} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": "
                            f"a non-empty string}}, got {msg!r:.200}")
    return messages


def decode_text(sample: dict) -> str | list[dict[str, str]]:
    """The text of a webdataset sample: its `txt` member, or its `json` member's chat messages.

    Args:
        sample: {"__key__", "__url__", ext: bytes}; exactly one of `txt` and `json`.
    Returns:
        the text (str) or the messages (list of {"role", "content"}); `BadSample` (the pipeline skips and counts it)
        when the sample has neither member or both, `txt` is not UTF-8, or `json` is not a valid dialog.
    """
    key = sample["__key__"]
    members = sorted(k for k in sample if not k.startswith("__"))
    if ("txt" in sample) == ("json" in sample):
        what = "both 'txt' and 'json'" if "txt" in sample else f"neither 'txt' nor 'json' (it has {members})"
        raise BadSample(f"sample {key} has {what}; a text sample holds {_ACCEPTED}")
    if "json" in sample:
        return _messages(key, sample["json"])
    try:
        return sample["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(f"sample {key}: 'txt' is not UTF-8 ({e.reason} at byte {e.start})") from None


class _TokenRow:
    """text → [bos] + ids + [eos], messages → the chat-format dialog, each with a flag per token that is True on the
    assistant's messages (header, content and `<|eot_id|>`); cut to seq_len (a picklable callable for DataLoader
    workers)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def __call__(self, text: str | list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        if isinstance(text, str):
            ids = self.tokenizer.encode(text, bos=True, eos=True)[: self.seq_len]
            return ids, [False] * len(ids)
        ids, assistant = [self.tokenizer.bos_id], [False]
        for message in text:  # encode_dialog's ids (it encodes each message separately too), flagged per message
            piece = self.tokenizer.encode_message(message["role"], message["content"])
            ids += piece
            assistant += [message["role"] == "assistant"] * len(piece)
        return ids[: self.seq_len], assistant[: self.seq_len]


class _PadRows:
    """Token rows → right-padded tokens (B, L), mask (B, L), True on real tokens, and assistant (B, L), True on the
    tokens of assistant messages."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[tuple[list[int], list[bool]]]) -> dict:
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        tokens = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)  # (B, L)
        assistant = torch.zeros(tokens.shape, dtype=torch.bool)  # (B, L)
        for i, (ids, flags) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            assistant[i, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]  # (B, L)
        return {"tokens": tokens, "mask": mask, "assistant": assistant}


class TextBatches:
    """Token batches of one data-parallel rank, deterministic and resumable at any batch.

    Args:
        config: the data section.
        rank, world_size: this process among the data-parallel ranks; each rank reads different shards.
    """

    def __init__(self, config: TextDataConfig, *, rank: int = 0, world_size: int = 1):
        self.config = config
        self.tokenizer = Tokenizer.from_file(config.tokenizer)
        self._source = ShardBatches(config, rank=rank, world_size=world_size, decode=decode_text,
                                    prepare=_TokenRow(self.tokenizer, config.seq_len),
                                    collate=_PadRows(self.tokenizer.pad_id))
        self.shards = self._source.shards

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from batch `start` on (what a fresh call yields from its `start`-th batch, exactly).

        Args:
            start: index of the first batch; training passes its data position to resume.
        Returns:
            an iterator (endless when `resampled`) of {"tokens": LongTensor (B, L), "mask": BoolTensor (B, L),
            "assistant": BoolTensor (B, L), True on the tokens of assistant messages, "skipped": bad samples since
            the previous batch, "samples": B}. Rows are `[bos] + ids + [eos]` (text) or
            the chat-format dialog (messages), cut to seq_len and right-padded with the tokenizer's pad id. `DataError`
            when too many samples are bad.
        """
        return self._source.batches(start)
