"""The shapes-world text corpus of stage `lm` (see `mm_llama.data.world`): the whole language, and the chat format.

The trunk learns the language once, here; the image, video and speech stages only add parts on the frozen trunk. So
the corpus holds every sentence form and every skill those stages use, each grounded in text, in four kinds of sample
(SAMPLE_KINDS, drawn with KIND_WEIGHTS):

    description (`txt`)   a caption of a scene, or of a clip with its events, then a few true statements:
                              There is a big red circle at the top left and a small blue star in the middle.
                              The circle is left of the star.
                              There is no square.
    chat (`json`)         {"messages": [{"role": "user", "content": "<caption or clip description> <question>"},
                                        {"role": "assistant", "content": "<answer>"}]}, any image or video question
                          type, answered by what the user turn describes (the caption stands where the image will)
    dialogue (`json`)     1-3 spoken exchanges (`world_dialogue`), the caption before the first user line
    repeat (`json`)       the speech stage's recognition task, typed: {"messages": [{"role": "system", "content":
                          "Repeat after me in English:"}, {"role": "user", "content": "<a question or caption>"},
                          {"role": "assistant", "content": "<the same sentence>"}]}

Why `repeat`: a frozen trunk can only write down what a speech adapter hears if it can repeat a sentence it is given,
a skill every real LLM has and a trunk trained on the other three kinds lacks (the first demo trunk answered
"Repeat after me in English: Two yellow stars ..." with "The yellow star is in the middle."). Without it the speech
adapter had to do the copying itself and stalled at 38 % WER on its own training sentences (issue 12's note).

Every sample is ASCII; the world's tokenizer (`world_tokenizer`: bytes + 256 merges learnt on this language, the
`debug` trunk's 768 words) is written beside the shards. `TextBatches` encodes `json` samples with the chat format.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from mm_llama.data.pack import write_shards
from mm_llama.data.synth_parallel import parallel_samples
from mm_llama.data.world import check_split, random_scene
from mm_llama.data.world_clips import describe_clip, random_clip, video_question
from mm_llama.data.world_dialogue import dialogue
from mm_llama.data.world_language import caption, image_question, relative_statements, scene_sentence, statements, uncap
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.errors import InputError
from mm_llama.speech_prompts import system_prompt

__all__ = ["KIND_WEIGHTS", "LANGUAGE_KINDS", "SAMPLE_KINDS", "kind_sample", "synth_text", "text_sample"]

LANGUAGE_KINDS = ("description", "chat", "dialogue")  # the world's language; `repeat` says its sentences again
SAMPLE_KINDS = (*LANGUAGE_KINDS, "repeat")
KIND_WEIGHTS = (2, 2, 2, 1)  # copying is one easy skill: a seventh of the samples teaches it
_CLIP_SHARE = 1 / 3  # of descriptions and chats: the rest are about still scenes


def _description(rng: random.Random, split: str) -> str:
    if rng.random() < _CLIP_SHARE:
        clip = random_clip(rng, split)
        lines = [describe_clip(clip, rng, split)]
        facts = statements(clip.end) + relative_statements(clip.end)
        lines += [f"At the end, {uncap(s)}" for s in rng.sample(facts, rng.randint(1, 2))]
        return "\n".join(lines)
    scene = random_scene(rng, split)
    lines = [caption(scene, rng, split)]
    relative = relative_statements(scene)
    facts = rng.sample(statements(scene), rng.randint(1, 3)) + ([rng.choice(relative)] if relative else [])
    return "\n".join(lines + rng.sample(facts, len(facts)))


def _chat(rng: random.Random, split: str) -> list[dict[str, str]]:
    if rng.random() < _CLIP_SHARE:
        clip = random_clip(rng, split)
        context, qa = describe_clip(clip, rng, split), video_question(clip, rng, split)
    else:
        scene = random_scene(rng, split)
        context, qa = caption(scene, rng, split), image_question(scene, rng, split)
    return [{"role": "user", "content": f"{context} {qa.question}"}, {"role": "assistant", "content": qa.answer}]


def _dialogue(rng: random.Random, split: str) -> list[dict[str, str]]:
    scene = random_scene(rng, split)
    context, messages = caption(scene, rng, split), dialogue(scene, rng, split)
    messages[0]["content"] = f"{context} {messages[0]['content']}"
    return messages


def _repeat(rng: random.Random, split: str) -> list[dict[str, str]]:
    sentence, _ = scene_sentence(rng, split)
    return [{"role": "system", "content": system_prompt("asr", "English")}, {"role": "user", "content": sentence},
            {"role": "assistant", "content": sentence}]


def text_sample(rng: random.Random, split: str = "train") -> dict[str, bytes]:
    """One corpus sample of a kind drawn with KIND_WEIGHTS (SAMPLE_KINDS); the same `rng` state gives the same bytes.

    Args:
        rng: the random source.
        split: "train" or "heldout": its scenes and sentences belong to it (see `mm_llama.data.world`).
    Returns:
        {"txt": description} or {"json": {"messages": [...]}}, ASCII bytes.
    """
    check_split(split)
    return kind_sample(rng, split, rng.choices(SAMPLE_KINDS, KIND_WEIGHTS)[0])


def kind_sample(rng: random.Random, split: str, kind: str) -> dict[str, bytes]:
    """One corpus sample of `kind` (in SAMPLE_KINDS), as `text_sample` returns it."""
    if kind not in SAMPLE_KINDS:
        raise InputError(f"kind must be one of {', '.join(SAMPLE_KINDS)}, got {kind!r}")
    while True:
        try:
            if kind == "description":
                return {"txt": _description(rng, split).encode("ascii")}
            messages = {"chat": _chat, "dialogue": _dialogue, "repeat": _repeat}[kind](rng, split)
            return {"json": json.dumps({"messages": messages}).encode("ascii")}
        except InputError:  # no wording of this split for that scene or clip: draw another
            continue


def synth_text(out: Path, n: int, *, seed: int = 0, split: str = "train", shard_size: int = 1000,
               workers: int | None = None) -> list[Path]:
    """Write `n` shapes-world text samples as shards, plus the world's `tokenizer.model`, into `out`.

    Args:
        out: output folder; shards are `out/text-000000.tar`, … and the tokenizer `out/tokenizer.model` (the world's
            tokenizer, n_words = 768: the `debug` trunk's vocabulary).
        n: number of samples.
        seed: the same seed gives the same corpus, byte for byte, whatever `workers` is.
        split: "train" or "heldout" (see `mm_llama.data.world`): the two never share a scene, caption or question.
        shard_size: samples per shard.
        workers: processes drawing the samples (None: the usable cores, at most 16; see `synth_parallel`).
    Returns:
        the shard paths.
    """
    check_split(split)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be a positive number of samples, got {n!r}")
    samples = parallel_samples(functools.partial(text_sample, split=split), n, seed=seed, workers=workers)
    paths = write_shards(Path(out), "text", samples, shard_size=shard_size, total=n, desc="synth text")
    write_world_tokenizer(Path(out) / "tokenizer.model")
    return paths
