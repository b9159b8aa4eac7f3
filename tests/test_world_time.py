"""Which clip questions need time (`mm_llama.data.world_time`): the order readings of a clip, and the accuracy of a
model that sees every frame but not their order."""

import collections
import random

import pytest

from mm_llama.data.world import Scene, Shape
from mm_llama.data.world_clips import Appear, Clip, Disappear, Move, Recolour, random_clip, video_question
from mm_llama.data.world_language import QA
from mm_llama.data.world_time import (
    TIME_QUESTION_TYPES,
    order_blind_accuracy,
    order_readings,
    reversed_event,
    time_question,
)
from mm_llama.errors import InputError

SQUARE = Shape("square", "red", "big", 1, 1)
STAR = Shape("star", "green", "small", 0, 2)


def test_an_event_reversed_twice_is_itself_and_a_reading_shows_the_same_scenes():
    for event in (Move(SQUARE, "left"), Recolour(SQUARE, "blue"), Appear(STAR), Disappear(STAR)):
        assert reversed_event(reversed_event(event)) == event
    rng = random.Random(0)
    for _ in range(200):
        clip = random_clip(rng)
        readings = order_readings(clip)
        assert readings[0] == clip and len(readings) == 2 ** len(clip.events) == len(set(readings))
        seen = {shape for scene in clip.scenes for shape in scene.shapes}
        for reading in readings:  # every shape in every state the clip shows, and nothing else
            assert {shape for scene in reading.scenes for shape in scene.shapes} == seen


def test_order_blind_accuracy_of_questions_with_and_without_time():
    moving = Clip(Scene((SQUARE, STAR), "white"), (Move(SQUARE, "left"),))
    assert order_blind_accuracy(moving, QA("Which way does the square move?", "It moves to the left.", "motion")) == 0.5
    assert order_blind_accuracy(moving, QA("Does the star move?", "No, it does not move.", "motion")) == 1.0
    appearing = Clip(Scene((SQUARE,), "white"), (Appear(STAR),))
    # "What appears?" tells that something appears: a bag of frames shows which shape comes and goes.
    assert order_blind_accuracy(appearing, QA("What appears?", "A green star appears.", "appearance")) == 1.0
    assert order_blind_accuracy(appearing, QA("How many shapes are there at the start?", "There is one shape.",
                                              "count")) == 0.5
    with pytest.raises(InputError, match="not a question and answer of the clip"):
        order_blind_accuracy(moving, QA("Which way does the square move?", "It moves up.", "motion"))


def test_time_questions_need_time_and_are_half_chance():
    rng = random.Random(1)
    chances, tries = collections.defaultdict(list), 0
    while min((len(chances[t]) for t in TIME_QUESTION_TYPES), default=0) < 5:
        tries += 1
        clip = random_clip(rng, "heldout")
        qtype = TIME_QUESTION_TYPES[tries % len(TIME_QUESTION_TYPES)]
        try:
            qa, chance = time_question(clip, rng, "heldout", qtype)
        except InputError:
            continue
        assert qa.qtype == qtype and chance == order_blind_accuracy(clip, qa) < 1
        chances[qtype].append(chance)
    assert all(0.25 <= min(v) and max(v) < 1 and sum(v) / len(v) <= 0.55 for v in chances.values()), chances
    # Left to chance, about 1 question in 10 needs time: the reason the eval and the training data pick them.
    need = []
    for _ in range(300):
        clip = random_clip(rng, "heldout")
        for qtype in TIME_QUESTION_TYPES:
            try:
                qa = video_question(clip, rng, "heldout", qtype)
            except InputError:
                continue
            need.append(order_blind_accuracy(clip, qa) < 1)
    assert 0.05 < sum(need) / len(need) < 0.3
