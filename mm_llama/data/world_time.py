"""Which clip questions need time: what a model that sees every frame of a clip, but not their order, can know.

Shuffled frames show the same things as the clip; only the order is gone. So do the clips `order_readings` gives,
each event played forwards or backwards: a model blind to order cannot tell them apart. A question *needs time* when
those readings answer it differently:

    needs time     "Which way does the triangle move?"         the triangle at two places: up or down?
                   "What colour is the circle at the end?"     the circle blue, and red: which is last?
                   "How many shapes are there at the start?"   a shape appears or disappears: 2 or 3?
    does not       "What appears?"                             the asking tells the intermittent shape appears
                   "Does the square move?" (it does not)       every frame says so

`order_blind_accuracy` is the expected accuracy of such a model guessing among the readings (1/2 for nearly every
question that needs time): the chance level that shuffling a clip brings a model that reads time down to, which
`mm-llama eval`'s video tasks report beside the accuracy. About 10 % of held-out clip questions need time (29 % of
motion questions, 20 % of colour and position questions at the start or end, 0 % of appearance questions).
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from mm_llama.data.world_clips import (
    Appear,
    Clip,
    Disappear,
    Event,
    Move,
    Recolour,
    clip_questions,
)
from mm_llama.data.world_language import QA, pick
from mm_llama.errors import InputError

__all__ = ["TIME_QUESTION_TYPES", "order_blind_accuracy", "order_readings", "reversed_event", "time_question"]

# The question types with enough questions that need time to draw from (>= 2 % of a type's held-out questions): the
# others (appearance, and shape, size, relative position at the start or end) are answered from a bag of frames.
TIME_QUESTION_TYPES = ("motion", "colour change", "disappearance", "colour", "count", "position", "existence")
_BACK = {"left": "right", "right": "left", "up": "down", "down": "up"}


def reversed_event(event: Event) -> Event:
    """The event played backwards: a move the other way, the colour turning back, an appearance a disappearance."""
    s = event.shape
    if isinstance(event, Move):
        return Move(event.moved, _BACK[event.direction])
    if isinstance(event, Recolour):
        return Recolour(dataclasses.replace(s, colour=event.colour), s.colour)
    return Disappear(s) if isinstance(event, Appear) else Appear(s)


def order_readings(clip: Clip) -> list[Clip]:
    """Every clip that the same frames show when their order is unknown: each event played forwards or backwards,
    the clip itself first. The events of a clip touch different shapes, so each can be reversed on its own."""
    out = []
    for flips in itertools.product((False, True), repeat=len(clip.events)):
        start = clip.start
        for event, flip in zip(clip.events, flips, strict=True):
            if flip:
                start = event.apply(start)  # that shape starts where, or as, the event leaves it
        out.append(Clip(start, tuple(reversed_event(e) if f else e for e, f in zip(clip.events, flips, strict=True))))
    return out


def _answers_by_reading(clip: Clip, qtype: str) -> list[dict[str, str]]:
    """Per order reading, every question of type `qtype` asked of it (both splits) -> its answer. (A question string
    belongs to one type, so the other types' questions could not match.)"""
    return [{q.question: q.answer for q in clip_questions(reading, qtype)} for reading in order_readings(clip)]


def _accuracy(readings: list[dict[str, str]], question: str, answer: str) -> float:
    answers = [asked[question] for asked in readings if question in asked]
    if answer not in answers:
        raise InputError(f"{question!r} -> {answer!r} is not a question and answer of the clip")
    return answers.count(answer) / len(answers)


def order_blind_accuracy(clip: Clip, qa: QA) -> float:
    """The expected accuracy on `qa.question` of a model that sees every frame of the clip but not their order and
    picks uniformly among the readings (`order_readings`) in which the question is asked; < 1 when it needs time.
    `InputError` when `qa.answer` is not the clip's answer to it."""
    return _accuracy(_answers_by_reading(clip, qa.qtype), qa.question, qa.answer)


def time_question(clip: Clip, rng: random.Random, split: str, qtype: str) -> tuple[QA, float]:
    """A random question of type `qtype` about the clip that needs time, as `world_clips.video_question` picks one
    (`world_language.pick`: a template, then a group, then a question of `split`), with its order-blind accuracy.
    `InputError` when the clip has none in `split`."""
    readings = _answers_by_reading(clip, qtype)
    scored = [(q, _accuracy(readings, q.question, q.answer)) for q in clip_questions(clip, qtype)]
    q = pick([q for q, a in scored if a < 1], rng, split)
    if q is None:
        raise InputError(f"the clip has no {qtype} question that needs time in split {split!r}; draw another clip")
    return QA(q.question, q.answer, qtype), next(a for candidate, a in scored if candidate == q)
