"""What the image and video stages' data share: a sample with one medium (a picture, a clip) becomes one chat about
it, and the loss reads only the answers.

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{follow-up question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{its answer}<|eot_id|> ...

(`<|video|>` for a clip; a caption sample asks the medium's caption prompt and answers with the caption). `labels`
is -100 everywhere but on the answers and their `<|eot_id|>`: the media token included (the output head has no row
for it). The `json` member is {"question", "answer"} and may add "follow_ups": [{"question", "answer"}, ...], more
questions about the same medium (LLaVA's multi-turn conversations do the same). Why (issue 10): with one question
per image, a batch of 64 held about 2 of the hard "which shape is at <place>" questions; four per image took the
demo's held-out image QA from 85 % to 90 % at the same steps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from mm_llama.data.pipeline import BadSample
from mm_llama.tokenizer import Tokenizer

__all__ = ["IGNORE", "Chat", "ChatDecode", "encode_chat", "pad_rows", "question_turns"]

IGNORE = -100  # label of positions the loss skips (F.cross_entropy's ignore_index)


class Chat(NamedTuple):
    """A decoded sample: its medium's file bytes (checked to decode) and its (question, answer) turns, in order."""

    media: bytes
    turns: tuple[tuple[str, str], ...]


class ChatDecode:
    """sample → `Chat`, or `BadSample` naming what is wrong (a picklable callable for DataLoader workers).

    Args:
        task: "qa" (the `json` question/answer and follow-ups), "caption" (the `txt` caption) or "mixed" (one of the
            two per sample, seeded by its key: the same on every pass and after a resume).
        seed: seeds the mixed task's choice.
        kind: the medium's name in messages ("image", "video").
        members: the sample members that may hold the medium, in order of preference.
        check: raises when the medium's bytes do not decode (any exception: the sample is then bad).
        caption_prompt: the question a caption sample asks.
    """

    def __init__(self, task: str, seed: int, *, kind: str, members: Sequence[str], check: Callable[[bytes], object],
                 caption_prompt: str):
        self.task, self.seed, self.kind, self.members = task, seed, kind, tuple(members)
        self.check, self.caption_prompt = check, caption_prompt

    def __call__(self, sample: dict) -> Chat:
        key = sample["__key__"]
        members = sorted(k for k in sample if not k.startswith("__"))
        media = next((sample[k] for k in self.members if k in sample), None)
        if media is None:
            raise BadSample(f"sample {key} has no {self.kind} member ({'/'.join(self.members)}; it has {members})")
        try:  # decoded here so that a bad file is counted even when fast-forwarded over
            self.check(media)
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the sample is unusable; it is counted
            raise BadSample(f"sample {key}: the {self.kind} does not decode ({type(e).__name__}: {e})") from None
        qa = caption = None
        if "json" in sample:
            try:
                record = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadSample(f"sample {key}: 'json' is not UTF-8 JSON ({e})") from None
            qa = question_turns(record, key)
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
        return Chat(media, qa if task == "qa" else ((self.caption_prompt, caption),))


def question_turns(record: object, key: str) -> tuple[tuple[str, str], ...]:
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


def encode_chat(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], kind: str, seq_len: int
                ) -> tuple[list[int], list[int]]:
    """(tokens, labels) of a chat whose first user turn opens with the medium `kind` ("image", "video"), cut at
    `seq_len`. Built message by message, as `Tokenizer.encode_dialog(messages, add_generation_prompt=False)` would
    encode the whole chat, without encoding it again for each turn."""
    header = len(tokenizer.encode_header("assistant"))
    tokens, labels = [tokenizer.bos_id], [IGNORE]
    for n, (question, answer) in enumerate(turns):
        # The medium opens the first user turn; the question is stripped, as a message's string form is.
        text = {"type": "text", "text": question.strip()}
        user = tokenizer.encode_message("user", [{"type": kind}, text] if n == 0 else [text])
        reply = tokenizer.encode_message("assistant", answer)  # header, answer, <|eot_id|>
        tokens += user + reply
        labels += [IGNORE] * (len(user) + header) + reply[header:]
        if len(tokens) >= seq_len:  # later turns would be cut off anyway
            break
    return tokens[:seq_len], labels[:seq_len]


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(tokens, labels) rows → {"tokens", "labels", "mask"} (B, L), right-padded to the longest row."""
    lengths = torch.tensor([len(tokens) for tokens, _ in rows])
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full_like(tokens, IGNORE)  # (B, L)
    for i, (row_tokens, row_labels) in enumerate(rows):
        tokens[i, : len(row_tokens)] = torch.tensor(row_tokens)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]  # (B, L)
    return {"tokens": tokens, "labels": labels, "mask": mask}
