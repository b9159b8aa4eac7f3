"""Spoken-style dialogues about a shapes-world scene (the register the speech stages will hear and say).

A user turn wraps an image question (see `world_language`) as one would say it,

    Hi! What colour is the circle?                      -> The circle is red.
    Could you tell me how many shapes there are?        -> There are three shapes.
    OK, is there an orange star?                        -> No, there is no orange star.
    Thanks!                                             -> You are welcome.

and the assistant replies with the question's answer, so a reply is still a function of the user line and the scene
(each template has its own spoken form). A user line is a sentence of its own split, and so is the question inside
it: a held-out question stays held out in every wording.
"""

from __future__ import annotations

import random

from mm_llama.data.world import Scene, check_split, split_of_sentence
from mm_llama.data.world_language import QUESTION_TYPES, Question, cap, pick, questions, uncap
from mm_llama.errors import InputError

__all__ = ["CLOSINGS", "dialogue", "user_lines"]

_FIRST = ("", "Hi! ", "Hello! ", "Hey! ")  # openers of a dialogue's first line
_LATER = ("", "And ", "OK, ", "So, ", "Now, ")
_INDIRECT = ("Could you tell me {}?", "Can you tell me {}?", "Do you know {}?", "Please tell me {}.",
             "I would like to know {}.", "I wonder {}.")
# A last user line that asks nothing → the reply.
CLOSINGS = {
    **dict.fromkeys(("Thanks!", "Thank you!", "Thanks a lot!", "Thank you very much!", "Thank you so much!",
                     "OK, thanks!", "OK, thank you!", "Great, thanks!", "Perfect, thanks!", "Cool, thank you!",
                     "Nice, thanks!", "That is all, thanks!"), "You are welcome."),
    **dict.fromkeys(("Bye!", "Bye bye!", "Goodbye!", "OK, bye!", "Thanks, bye!", "See you!"), "Goodbye!"),
}
_ATTEMPTS = 50


def user_lines(question: Question, first: bool) -> list[str]:
    """Every spoken wording of a question: an opener ("Hi! ", "OK, ", …), then the question as it is or embedded
    ("Could you tell me what colour the circle is?")."""
    bodies = [question.question] + [form.format(question.indirect) for form in _INDIRECT]
    out = []
    for opener in _FIRST if first else _LATER:
        for body in bodies:
            out.append(opener + (cap(body) if opener in _FIRST else uncap(body)))
    return out


def _exchange(scene: Scene, rng: random.Random, split: str, first: bool) -> tuple[str, str]:
    """One spoken question of `split` about the scene and its answer."""
    types = [t for t in QUESTION_TYPES if t != "relative position" or len(scene.shapes) > 1]
    for _ in range(_ATTEMPTS):
        q = pick(questions(scene, rng.choice(types)), rng, split)
        if q is None:
            continue
        lines = [line for line in user_lines(q, first) if split_of_sentence(line) == split]
        if lines:
            return rng.choice(lines), q.answer
    raise InputError(f"found no spoken question about the scene {scene.key()!r} in split {split!r}; "
                     "draw another scene")


def dialogue(scene: Scene, rng: random.Random, split: str = "train") -> list[dict[str, str]]:
    """1-3 spoken exchanges about the scene; a dialogue of two or more may end with thanks or a goodbye.

    Args:
        scene: the scene (seen in an image, or described before the first line in a text sample).
        rng: the random source; the same state gives the same dialogue.
        split: "train" or "heldout": every user line and every question inside one belongs to it.
    Returns:
        the messages, [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...].
    """
    check_split(split)
    n = rng.randint(1, 3)
    closings = [c for c in CLOSINGS if split_of_sentence(c) == split]
    messages = []
    for i in range(n):
        if i == n - 1 and i > 0 and closings and rng.random() < 0.5:
            line = rng.choice(closings)
            answer = CLOSINGS[line]
        else:
            line, answer = _exchange(scene, rng, split, first=i == 0)
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
    return messages
