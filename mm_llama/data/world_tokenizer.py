"""The shapes world's tokenizer: byte-level BPE with merges learnt from the world's own language.

A byte per token made the demo's samples 235 tokens long on average (583 at most, past the trunk's 512-token rows) and
its words 3-8 tokens each. With merges, as every real Llama tokenizer has, samples are 3.3x shorter and every shape,
colour, size and place word is one token (plurals and rarer dialogue words take two or three), so a training step of
the same cost holds several times the samples and an answer takes several times fewer decode steps. The held-out
text QA of a trunk trained on either is within the spread between runs (issue 10's note).

The table is a Llama 3 ranks file like Meta's: 256 single bytes first, so any text still encodes, then `N_MERGES`
merges in the order they were learnt, which is the order tiktoken applies them; 256 special tokens follow, so
`n_words` = 256 + N_MERGES + 256.

The merges are learnt from train-split text only (held-out sentences never shape the table), deterministically, and
the table is package data (`world_tokenizer.model`); `tests/test_world.py` checks that learning it again gives the
same file, so a change of the world's language cannot silently leave a stale table. After such a change, write the
new table with `mm_llama.tokenizer.write_ranks(WORLD_TOKENIZER, learn_world_ranks())`.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path

import regex

from mm_llama.tokenizer import SPLIT_PATTERN, load_ranks

__all__ = ["N_MERGES", "WORLD_TOKENIZER", "learn_world_ranks", "world_ranks", "write_world_tokenizer"]

N_MERGES = 256  # every shape, colour, size and place word is one token; the trunk's vocabulary is 768
WORLD_TOKENIZER = Path(__file__).resolve().parent / "world_tokenizer.model"
_SAMPLES = 5000  # train-split text samples the merges are counted on: every word form occurs many times


def _texts(n: int, seed: int) -> list[str]:
    """The plain text of `n` train-split samples of the world's language (LANGUAGE_KINDS, drawn uniformly; of chat
    samples, the message contents). The corpus's `repeat` samples are left out: they say the same sentences again and
    add no word, so the table need not change with their share (models trained before they came keep their table)."""
    from mm_llama.data.synth_text import LANGUAGE_KINDS, kind_sample

    rng, texts = random.Random(seed), []
    for _ in range(n):
        sample = kind_sample(rng, "train", rng.choice(LANGUAGE_KINDS))
        if "txt" in sample:
            texts.append(sample["txt"].decode("ascii"))
        else:
            texts += [message["content"] for message in json.loads(sample["json"])["messages"]]
    return texts


def learn_world_ranks(n_merges: int = N_MERGES, n_samples: int = _SAMPLES, seed: int = 0) -> dict[bytes, int]:
    """Learn a BPE ranks table on the world's train-split text.

    Args:
        n_merges: merges after the 256 bytes; `ValueError` if the text has fewer pairs left to merge.
        n_samples, seed: which text the counts come from.
    Returns:
        token bytes -> rank, 0..255 the single bytes and 256.. the merges in the order learnt.
    """
    pieces = Counter(piece.encode("ascii") for text in _texts(n_samples, seed)
                     for piece in regex.findall(SPLIT_PATTERN, text))
    # Each piece as its current tokens; merging a pair rewrites every piece that holds it.
    words = {piece: tuple(bytes([b]) for b in piece) for piece in pieces}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 256 + n_merges:
        pairs = Counter()
        for piece, tokens in words.items():
            for pair in pairwise(tokens):
                pairs[pair] += pieces[piece]
        if not pairs:
            raise ValueError(f"the world's text holds only {len(ranks) - 256} merges; ask for fewer than {n_merges}")
        # The most frequent pair; ties go to the smaller bytes, so the table never depends on dict order.
        (left, right), _ = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        merged = left + right
        ranks[merged] = len(ranks)
        for piece, tokens in words.items():
            if merged in piece:
                out, i = [], 0
                while i < len(tokens):
                    if i + 1 < len(tokens) and tokens[i] == left and tokens[i + 1] == right:
                        out.append(merged)
                        i += 2
                    else:
                        out.append(tokens[i])
                        i += 1
                words[piece] = tuple(out)
    return ranks


def world_ranks() -> dict[bytes, int]:
    """The shipped table (`world_tokenizer.model`), what `mm-llama data synth` writes beside every shapes-world set."""
    return load_ranks(WORLD_TOKENIZER)


def write_world_tokenizer(path: Path) -> None:
    """Write the shipped table to `path` (the `tokenizer.model` beside a shapes-world data set)."""
    shutil.copyfile(WORLD_TOKENIZER, path)
