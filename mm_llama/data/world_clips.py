"""Clips of the shapes world: a start scene and 1-2 events, told and asked (`world_video` renders them as mp4s,
`synth_video` writes them as shards).

Events: a shape moves one cell (left, right, up, down), turns another colour, appears in an empty cell, or
disappears. The events of a clip are of different types and happen to different shapes, so "What appears?" and
"Which way does the square move?" each have one answer, and a shape keeps its start colour until its own event.

    description  There is a big red square in the middle. The red square moves to the left. A small green star
                 appears at the top right.
    questions    Which way does the red square move?   -> It moves to the left.         (motion)
                 What colour does the circle turn?     -> The circle turns blue.        (colour change)
                 What appears?                         -> A green star appears.         (appearance)
                 What disappears?                      -> The triangle disappears.      (disappearance)
                 What colour is the circle at the end? -> The circle is blue.           (colour: one frame)
A clip belongs to its start scene's split (the scene its description captions); its event descriptions and questions
are sentences with their own split (see `mm_llama.data.world`).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import ClassVar

from mm_llama.data.world import (
    COLOURS,
    DIRECTIONS,
    GRID,
    MAX_SHAPES,
    PLACES,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    check_split,
    random_scene,
    split_of_sentence,
)
from mm_llama.data.world_language import QA, QUESTION_TYPES, Question, a, cap, caption, kind_refs, pick, questions
from mm_llama.errors import InputError

__all__ = [
    "Appear", "Clip", "Disappear", "Event", "Move", "Recolour", "VIDEO_QUESTION_TYPES", "clip_questions",
    "describe_clip", "event_sentences", "random_clip", "video_question",
]

VIDEO_QUESTION_TYPES = ("motion", "colour change", "appearance", "disappearance")
_TOWARDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


def _replace(scene: Scene, old: Shape | None, new: Shape | None) -> Scene:
    shapes = tuple(s for s in scene.shapes if s != old) + ((new,) if new else ())
    return Scene(shapes, scene.background)


@dataclass(frozen=True)
class Move:
    """`shape` moves one cell towards `direction` (a key of DIRECTIONS)."""

    shape: Shape
    direction: str
    qtype: ClassVar[str] = "motion"

    @property
    def moved(self) -> Shape:
        dr, dc = DIRECTIONS[self.direction]
        return dataclasses.replace(self.shape, row=self.shape.row + dr, col=self.shape.col + dc)

    def apply(self, scene: Scene) -> Scene:
        return _replace(scene, self.shape, self.moved)


@dataclass(frozen=True)
class Recolour:
    """`shape` turns `colour`."""

    shape: Shape
    colour: str
    qtype: ClassVar[str] = "colour change"

    def apply(self, scene: Scene) -> Scene:
        return _replace(scene, self.shape, dataclasses.replace(self.shape, colour=self.colour))


@dataclass(frozen=True)
class Appear:
    """`shape` appears (its kind was not in the scene, its cell was empty)."""

    shape: Shape
    qtype: ClassVar[str] = "appearance"

    def apply(self, scene: Scene) -> Scene:
        return _replace(scene, None, self.shape)


@dataclass(frozen=True)
class Disappear:
    """`shape` disappears."""

    shape: Shape
    qtype: ClassVar[str] = "disappearance"

    def apply(self, scene: Scene) -> Scene:
        return _replace(scene, self.shape, None)


Event = Move | Recolour | Appear | Disappear


@dataclass(frozen=True)
class Clip:
    """A start scene and the events that follow, in order."""

    start: Scene
    events: tuple[Event, ...]

    @property
    def scenes(self) -> list[Scene]:
        """The start scene and the scene after each event."""
        out = [self.start]
        for event in self.events:
            out.append(event.apply(out[-1]))
        return out

    @property
    def end(self) -> Scene:
        return self.scenes[-1]

    def event(self, qtype: str) -> Event | None:
        """The clip's event of that type (one of VIDEO_QUESTION_TYPES), or None."""
        return next((e for e in self.events if e.qtype == qtype), None)


def _events(kind: str, scene: Scene, used: set[str]) -> list[Event]:
    """Every event of that kind that can happen to a shape not in `used` (kinds)."""
    free = [cell for cell in PLACES if scene.at(*cell) is None]
    shapes = [s for s in scene.shapes if s.kind not in used]
    if kind == "move":
        return [Move(s, d) for s in shapes for d, (dr, dc) in DIRECTIONS.items()
                if 0 <= s.row + dr < GRID and 0 <= s.col + dc < GRID and scene.at(s.row + dr, s.col + dc) is None]
    if kind == "recolour":
        return [Recolour(s, c) for s in shapes for c in COLOURS if c != s.colour]
    if kind == "appear":
        if len(scene.shapes) == MAX_SHAPES:
            return []
        kinds = [k for k in SHAPES if scene.shape(k) is None and k not in used]
        return [Appear(Shape(k, c, z, *cell)) for k, c, z, cell in itertools.product(kinds, COLOURS, SIZES, free)]
    return [Disappear(s) for s in shapes] if len(scene.shapes) > 1 else []  # never an empty scene


def random_clip(rng: random.Random, split: str = "train") -> Clip:
    """A random clip: a start scene of `split` and 1-2 events of different types, to different shapes.

    Args:
        rng: the random source; the same state gives the same clip.
        split: "train" or "heldout" (the start scene's split).
    Returns:
        the clip.
    """
    check_split(split)
    while True:
        scene = start = random_scene(rng, split)
        events, used = [], set()
        for kind in rng.sample(("move", "recolour", "appear", "disappear"), rng.randint(1, 2)):
            options = _events(kind, scene, used)
            if not options:
                break
            events.append(rng.choice(options))
            scene = events[-1].apply(scene)
            used.add(events[-1].shape.kind)
        else:
            return Clip(start, tuple(events))


def event_sentences(event: Event) -> list[str]:
    """Every description of an event ("The red square moves to the left.", "A small green star appears at the top
    right."); each says all that changes, so the description of a clip gives its end scene."""
    s = event.shape
    if isinstance(event, Move):
        towards = _TOWARDS[event.direction]
        return [f"{cap(r)} {verb} {towards}." for r in kind_refs(s) for verb in ("moves", "goes")]
    if isinstance(event, Recolour):
        return [f"{cap(r)} {verb} {event.colour}." for r in kind_refs(s) for verb in ("turns", "becomes")]
    if isinstance(event, Appear):
        noun = a(f"{s.size} {s.colour} {s.kind}")
        return [f"{cap(noun)} {verb} {s.place}." for verb in ("appears", "shows up")] + [
            f"{cap(s.place)} {noun} {verb}." for verb in ("appears", "shows up")]
    return [f"{cap(r)} {verb}." for r in kind_refs(s) for verb in ("disappears", "vanishes")]


def describe_clip(clip: Clip, rng: random.Random, split: str = "train") -> str:
    """A caption of the start scene, then one sentence per event, every sentence of `split`.

    Args:
        clip: the clip.
        rng: the random source.
        split: "train" or "heldout".
    Returns:
        the description; `InputError` when some sentence has no wording in `split` (draw another clip).
    """
    parts = [caption(clip.start, rng, split)]
    for event in clip.events:
        choices = [t for t in event_sentences(event) if split_of_sentence(t) == split]
        if not choices:
            raise InputError(f"the event {event} has no description in split {split!r}; draw another clip")
        parts.append(rng.choice(choices))
    return " ".join(parts)


def _motion(clip: Clip) -> list[Question]:
    move, gone = clip.event("motion"), clip.event("disappearance")
    out = []
    if isinstance(move, Move):
        s, towards = move.shape, _TOWARDS[move.direction]
        for r in kind_refs(s):
            out += [Question(0, "", f"Which way does {r} move?", "", f"It moves {towards}."),
                    Question(1, "", f"Where does {r} move?", "", f"{cap(r)} moves {towards}.")]
        out.append(Question(2, "", f"Which shape moves {towards}?", "", f"The {s.colour} {s.kind} moves {towards}."))
    for s in clip.start.shapes:
        if gone is None or s != gone.shape:
            moves = move is not None and move.shape == s
            answer = f"Yes, it moves {_TOWARDS[move.direction]}." if moves else "No, it does not move."
            out += [Question(3, "yes" if moves else "no", f"Does {r} move?", "", answer) for r in kind_refs(s)]
    return out


def _colour_change(clip: Clip) -> list[Question]:
    change, gone = clip.event("colour change"), clip.event("disappearance")
    out = []
    if isinstance(change, Recolour):
        s, c = change.shape, change.colour
        for r in kind_refs(s):
            out += [Question(0, "", f"What colour does {r} turn?", "", f"{cap(r)} turns {c}."),
                    Question(2, "", f"What colour does {r} become?", "", f"It becomes {c}.")]
        out.append(Question(1, "", f"Which shape turns {c}?", "", f"The {s.kind} turns {c}."))
    for s in clip.start.shapes:
        if gone is None or s != gone.shape:
            turns = change is not None and change.shape == s
            answer = f"Yes, it turns {change.colour}." if turns else f"No, it stays {s.colour}."
            out += [Question(3, "yes" if turns else "no", f"Does {r} change colour?", "", answer) for r in kind_refs(s)]
    return out


def _appearance(clip: Clip) -> list[Question]:
    new = clip.event("appearance")
    out = []
    if isinstance(new, Appear):
        s = new.shape
        out += [Question(0, "", "What appears?", "", f"{cap(a(f'{s.colour} {s.kind}'))} appears."),
                Question(1, "", f"What appears {s.place}?", "", f"{cap(a(f'{s.size} {s.colour} {s.kind}'))} appears "
                         f"{s.place}.")]
        out += [Question(2, "", f"Where does {r} appear?", "", f"{cap(r)} appears {s.place}.") for r in kind_refs(s)]
    for kind, colour in itertools.product(SHAPES, (None, *COLOURS)):
        desc = a(" ".join(w for w in (colour, kind) if w))
        if clip.start.shape(kind) is not None:
            continue  # it cannot appear
        if isinstance(new, Appear) and new.shape.kind == kind and colour in (None, new.shape.colour):
            out.append(Question(3, "yes", f"Does {desc} appear?", "", f"Yes, {a(f'{new.shape.colour} {kind}')} "
                                "appears."))
        else:
            out.append(Question(3, "no", f"Does {desc} appear?", "", f"No, {desc} does not appear."))
    return out


def _disappearance(clip: Clip) -> list[Question]:
    gone = clip.event("disappearance")
    out = []
    if isinstance(gone, Disappear):
        s = gone.shape
        out += [Question(0, "", "What disappears?", "", f"The {s.kind} disappears."),
                Question(1, "", "Which shape disappears?", "", f"The {s.colour} {s.kind} disappears.")]
    for s in clip.start.shapes:
        yes = gone is not None and gone.shape == s
        for r in kind_refs(s):
            out += [Question(2, "yes" if yes else "no", f"Does {r} disappear?", "",
                             "Yes, it disappears." if yes else "No, it does not disappear."),
                    Question(3, "no" if yes else "yes", f"Is {r} still there at the end?", "",
                             "No, it disappears." if yes else "Yes, it is still there.")]
    return out


_QUESTIONS = {"motion": _motion, "colour change": _colour_change, "appearance": _appearance,
              "disappearance": _disappearance}


def clip_questions(clip: Clip, qtype: str) -> list[Question]:
    """Every question of type `qtype` about the clip, in both splits: a type of VIDEO_QUESTION_TYPES, or one of
    QUESTION_TYPES asked of the start or the end scene ("What colour is the circle at the end?"). Questions about
    events have no spoken form yet (`Question.indirect` is "")."""
    if qtype in _QUESTIONS:
        return _QUESTIONS[qtype](clip)
    if qtype not in QUESTION_TYPES:
        raise InputError(f"unknown clip question type {qtype!r}; accepted: "
                         f"{', '.join(VIDEO_QUESTION_TYPES + QUESTION_TYPES)}")
    out = []
    for i, (when, scene) in enumerate((("start", clip.start), ("end", clip.end))):
        out += [Question(q.template + 10 * i, q.group, f"{q.question[:-1]} at the {when}?",
                         f"{q.indirect} at the {when}", q.answer) for q in questions(scene, qtype)]
    return out


def video_question(clip: Clip, rng: random.Random, split: str = "train", qtype: str | None = None) -> QA:
    """A random question about the clip, with its answer.

    Args:
        clip: the clip.
        rng: the random source.
        split: "train" or "heldout": the question string belongs to it.
        qtype: one of VIDEO_QUESTION_TYPES (about the events), or of QUESTION_TYPES (about the start or end scene);
            None: half the time a uniform one of VIDEO_QUESTION_TYPES, else of QUESTION_TYPES (a type the clip does
            not allow is drawn again).
    Returns:
        the QA; its answer is a function of the question string and the clip. `InputError` when the clip has no
        question of `qtype` in `split`.
    """
    check_split(split)
    tried = set()
    while True:
        if qtype is not None:
            t = qtype
        else:
            t = rng.choice(VIDEO_QUESTION_TYPES if rng.random() < 0.5 else QUESTION_TYPES)
        q = pick(clip_questions(clip, t), rng, split)
        if q is not None:
            return QA(q.question, q.answer, t)
        tried.add(t)
        if qtype is not None or len(tried) == len(VIDEO_QUESTION_TYPES + QUESTION_TYPES):
            raise InputError(f"the clip has no {qtype or 'video'} question in split {split!r}; draw another clip")
