"""Shapes-world videos (see `mm_llama.data.world_clips`, `world_video`): one clip per sample, told and asked.

Each sample is an mp4 (`mp4`), the clip's description (`txt`: a caption of the start scene, then one sentence per
event) and a question with its answer and type, plus follow-up questions about the same clip (`json`, as the image
samples of `synth_image`), e.g.
    mp4   84 x 84, 2-4 s at 8-15 fps: a big red square in the middle glides left; a small green star pops in
    txt   There is a big red square in the middle. The red square moves to the left. A small green star appears at
          the top right.
    json  {"question": "Which way does the red square move?", "answer": "It moves to the left.", "type": "motion",
           "follow_ups": [{"question": "What colour is the star at the end?", "answer": "The star is green.",
           "type": "colour"}, ...]}
Question types (CLIP_QUESTION_TYPES): the events' (VIDEO_QUESTION_TYPES: motion, colour change, appearance,
disappearance) and the image world's asked of the start or the end scene ("What colour is the circle at the end?",
QUESTION_TYPES: one frame answers them). By default half the questions are about events, 1/8 of each event type, and
half about a scene, 1/14 of each scene type: the mix `world_clips.video_question` draws. Within a type, 7 questions
in 10 (TIME_SHARE) are drawn among those that need time (`world_time`: "Which way does the circle move?" when the
circle is seen at two places), where the clip has one: 24 % of all questions, against 10 % left to chance.

Splits as in the rest of the world: a clip belongs to its start scene's split; its caption, event sentences and
questions each belong to the split (answers are exempt).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Mapping
from pathlib import Path

from mm_llama.data.pack import write_shards
from mm_llama.data.synth_image import check_sample_args, first_question, follow_ups, type_weights_list
from mm_llama.data.synth_parallel import parallel_samples
from mm_llama.data.world import check_split
from mm_llama.data.world_clips import VIDEO_QUESTION_TYPES, Clip, describe_clip, random_clip, video_question
from mm_llama.data.world_draw import DEFAULT_SIZE
from mm_llama.data.world_language import QA, QUESTION_TYPES
from mm_llama.data.world_time import time_question
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.data.world_video import FPS, SECONDS, check_timing, encode_mp4, find_ffmpeg, render_clip
from mm_llama.errors import InputError

__all__ = ["CLIP_QUESTION_TYPES", "DEFAULT_TYPE_WEIGHTS", "QUESTIONS_PER_CLIP", "TIME_SHARE", "check_time_share",
           "clip_record", "synth_video", "video_sample", "video_type_weights"]

CLIP_QUESTION_TYPES = VIDEO_QUESTION_TYPES + QUESTION_TYPES
# Half the questions about events (4 types), half about the start or end scene (7 types), as `video_question` draws.
DEFAULT_TYPE_WEIGHTS = {**dict.fromkeys(VIDEO_QUESTION_TYPES, len(QUESTION_TYPES) / len(VIDEO_QUESTION_TYPES)),
                        **dict.fromkeys(QUESTION_TYPES, 1.0)}
QUESTIONS_PER_CLIP = 4  # as QUESTIONS_PER_IMAGE: the first and 3 follow-ups, trained as one chat
# Questions drawn among those that need time (`world_time`), where a clip has one of the drawn type: left to chance,
# 1 question in 10 needs time (a bag of frames answers the rest), too few to learn what an order means.
TIME_SHARE = 0.7


def check_time_share(time_share: float) -> None:
    if not isinstance(time_share, int | float) or isinstance(time_share, bool) or not 0 <= time_share <= 1:
        raise InputError(f"time_share must be a number from 0 to 1, got {time_share!r}")


def video_type_weights(weights: Mapping[str, float] | None) -> list[float]:
    """Per CLIP_QUESTION_TYPES, the relative weight of drawing it: `weights[type]`, DEFAULT_TYPE_WEIGHTS' for a type
    not named (7/4 for an event type, 1 for a scene type); checked as `synth_image.type_weights_list` does."""
    return type_weights_list(weights, CLIP_QUESTION_TYPES, DEFAULT_TYPE_WEIGHTS)


def clip_record(rng: random.Random, split: str = "train", questions: int = QUESTIONS_PER_CLIP,
                type_weights: Mapping[str, float] | None = None, time_share: float = TIME_SHARE
                ) -> tuple[Clip, str, dict]:
    """The language of one sample, nothing drawn: a random clip of `split`, its description and its questions.

    Args:
        rng: the random source.
        split: "train" or "heldout": the start scene, the description's sentences and the questions belong to it.
        questions: questions about the clip (>= 1): the first, then `questions - 1` follow-ups of types drawn by
            `type_weights`; a follow-up that repeats an earlier question, or whose type the clip has none of in
            `split`, is left out.
        type_weights: relative weights of CLIP_QUESTION_TYPES (see `video_type_weights`); None: the default mix.
        time_share: the chance that a question is one that needs time (`world_time`), where the clip has one of its
            type; else any question of the type.
    Returns:
        (the clip, its description, {"question", "answer", "type", "follow_ups": [{"question", "answer", "type"},
        ...]}).
    """
    check_split(split)
    check_time_share(time_share)
    weights = video_type_weights(type_weights)

    def ask(clip: Clip, qtype: str) -> QA:
        if rng.random() < time_share:
            try:
                return time_question(clip, rng, split, qtype)[0]
            except InputError:  # none of this type needs time in this clip
                pass
        return video_question(clip, rng, split, qtype)

    # Redrawn when there is nothing of this split to say, or e.g. nothing can appear (all four kinds are there).
    clip, text, qa = first_question(rng, CLIP_QUESTION_TYPES, weights, lambda: random_clip(rng, split),
                                    lambda clip: describe_clip(clip, rng, split), ask)
    more = follow_ups(rng, CLIP_QUESTION_TYPES, weights, lambda qtype: ask(clip, qtype), qa, questions - 1)
    return clip, text, {"question": qa.question, "answer": qa.answer, "type": qa.qtype, "follow_ups": more}


def video_sample(rng: random.Random, split: str = "train", size: int = DEFAULT_SIZE,
                 questions: int = QUESTIONS_PER_CLIP, type_weights: Mapping[str, float] | None = None,
                 fps: tuple[int, int] = FPS, seconds: tuple[float, float] = SECONDS,
                 time_share: float = TIME_SHARE) -> dict[str, bytes]:
    """One sample {"mp4", "txt", "json"} of a random clip of `split`; the same `rng` state gives the same bytes.

    Args:
        rng: the random source.
        split, questions, type_weights, time_share: as for `clip_record`.
        size: the frame side in pixels, even, >= 30.
        fps, seconds: (low, high) frame rate and length, drawn per clip (see `world_video.render_clip`).
    Returns:
        the members: the mp4's bytes, the description, and the JSON of `clip_record`, ASCII.
    """
    clip, text, record = clip_record(rng, split, questions, type_weights, time_share)
    video = render_clip(clip, rng, size=size, fps=fps, seconds=seconds)
    mp4 = encode_mp4(video.frames, video.fps)
    return {"mp4": mp4, "txt": text.encode("ascii"), "json": json.dumps(record).encode("ascii")}


def synth_video(out: Path, n: int, *, seed: int = 0, split: str = "train", size: int = DEFAULT_SIZE,
                questions: int = QUESTIONS_PER_CLIP, type_weights: Mapping[str, float] | None = None,
                fps: tuple[int, int] = FPS, seconds: tuple[float, float] = SECONDS, time_share: float = TIME_SHARE,
                shard_size: int = 1000, workers: int | None = None) -> list[Path]:
    """Write `n` shapes-world clips (mp4) with descriptions and Q/A as webdataset shards, plus the world's tokenizer.

    Each clip costs about 0.1 s, nearly all of it ffmpeg's start-up (one process per clip; see `world_video`).

    Args:
        out: output folder; shards are `out/video-000000.tar`, … and the tokenizer `out/tokenizer.model` (the world's
            tokenizer, as `synth_image` writes it).
        n: number of samples.
        seed: the same seed gives the same shards, byte for byte, whatever `workers` is (with the same ffmpeg).
        split: "train" or "heldout" (see `mm_llama.data.world`): the two never share a start scene or a sentence.
        size: frame side in pixels, even (H.264 in yuv420p), >= 30.
        questions: questions per clip, >= 1 (see `clip_record`).
        type_weights: relative weights of the question types, e.g. {"motion": 2, "count": 0} (see
            `video_type_weights`); None: the default mix.
        fps, seconds: (low, high) frame rate and length of the clips (defaults 8-15 fps, 2-4 s).
        time_share: the share of questions drawn among those that need time (see `clip_record`).
        shard_size: samples per shard.
        workers: processes making the samples (None: the usable cores, at most 16; see `synth_parallel`).
    Returns:
        the shard paths.
    """
    check_sample_args(split, n, size, questions)
    if size % 2:
        raise InputError(f"size must be even for video (H.264 in yuv420p halves both sides), got {size}")
    video_type_weights(type_weights)  # said before any work
    check_timing(fps, seconds)
    check_time_share(time_share)
    find_ffmpeg()
    sample = functools.partial(video_sample, split=split, size=size, questions=questions, type_weights=type_weights,
                               fps=fps, seconds=seconds, time_share=time_share)
    samples = parallel_samples(sample, n, seed=seed, workers=workers)
    paths = write_shards(Path(out), "video", samples, shard_size=shard_size, total=n, desc="synth video")
    write_world_tokenizer(Path(out) / "tokenizer.model")
    return paths
