"""Word error rate of transcripts, with jiwer: (substitutions + deletions + insertions) / reference words, on words
normalised the usual way for WER (lower case, punctuation removed, whitespace collapsed), so that "Where is it?"
and "where is it" are the same words."""

from __future__ import annotations

import re

import jiwer

__all__ = ["normalize_words", "word_errors"]

_NOT_WORD = re.compile(r"[^\w\s']")


def normalize_words(text: str) -> list[str]:
    """`text`'s words, lower case, without punctuation (apostrophes inside words kept: "it's")."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit operations turning the hypothesis' words into the reference's, the reference's words): WER is their
    ratio, summed over a corpus before dividing."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        raise ValueError("the reference has no words: WER is undefined")
    if not hyp:  # everything deleted (jiwer wants a non-empty hypothesis)
        return len(ref), len(ref)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return out.substitutions + out.deletions + out.insertions, len(ref)
