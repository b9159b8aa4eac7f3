"""Shapes-world videos: rendering a clip, its mp4, the shards of `mm-llama data synth --kind video`.

The events are checked on what a model sees: the mp4 decoded by decord at the 16 frames a uniform sampler takes.
"""

import io
import json
import random
import re
import shutil
import sys
import tarfile
import types
from collections import Counter

import decord
import numpy as np
import pytest

from mm_llama.cli import main
from mm_llama.data.synth_video import CLIP_QUESTION_TYPES, clip_record, synth_video, video_sample, video_type_weights
from mm_llama.data.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    PLACES,
    SHAPES,
    Scene,
    Shape,
    split_of_scene,
    split_of_sentence,
)
from mm_llama.data.world_clips import VIDEO_QUESTION_TYPES, Appear, Clip, Disappear, Move, Recolour, random_clip
from mm_llama.data.world_draw import BACKGROUND_RGB, RGB, draw_scene
from mm_llama.data.world_language import QUESTION_TYPES
from mm_llama.data.world_tokenizer import WORLD_TOKENIZER
from mm_llama.data.world_video import (
    SAMPLED_FRAMES,
    encode_mp4,
    find_ffmpeg,
    render_clip,
    sampled_indices,
    schedule,
)
from mm_llama.errors import InputError

CELL = 28  # pixels per cell at the default 84 px
CELL_OF = {place: cell for cell, place in PLACES.items()}
PLACE = "|".join(sorted(PLACES.values(), key=len, reverse=True))
SHAPE_WORDS = rf"(?:a|an) (small|big) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"


def seen(clip: Clip, seed: int) -> tuple[np.ndarray, int]:
    """(the 16 sampled frames of the clip's mp4 decoded by decord, (16, 84, 84, 3); the clip's frame count)."""
    video = render_clip(clip, random.Random(seed))
    reader = decord.VideoReader(io.BytesIO(encode_mp4(video.frames, video.fps)))
    assert len(reader) == len(video.frames) and reader.get_avg_fps() == video.fps
    return reader.get_batch(sampled_indices(len(reader))).asnumpy(), len(reader)


def near(frame: np.ndarray, colour: str, tolerance: int = 40) -> np.ndarray:
    """(H, W) mask of the pixels within `tolerance` of a colour of the world."""
    return (np.abs(frame.astype(int) - RGB[colour]) <= tolerance).all(-1)


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    assert len(ys) > 10, "the shape is not in the frame"
    return np.array([ys.mean(), xs.mean()])


def in_cell(frame: np.ndarray, row: int, col: int) -> np.ndarray:
    return frame[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]


def centre_colour(frame: np.ndarray, shape: Shape) -> np.ndarray:
    """The decoded colour at the centre of the shape's pixels in its cell (pixels unlike the background)."""
    cell = in_cell(frame, shape.row, shape.col).astype(int)
    y, x = np.rint(centroid((np.abs(cell - cell[0, 0]) > 40).any(-1))).astype(int)
    return cell[y, x]


def parse_caption(text: str) -> Scene:
    """The shapes a caption (any of its forms) names."""
    found = [(m[1], m[2], m[3], m[4].lower()) for m in re.finditer(rf"{SHAPE_WORDS}(?: is)? ({PLACE})", text, re.I)]
    found += [(m[2], m[3], m[4], m[1].lower()) for m in re.finditer(rf"({PLACE}) there is {SHAPE_WORDS}", text, re.I)]
    return Scene(tuple(Shape(kind, colour, size, *CELL_OF[place]) for size, colour, kind, place in found), "white")


def members(paths) -> dict[str, dict[str, bytes]]:
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


# --- rendering --------------------------------------------------------------------------------------------------------


def test_rendering_is_deterministic_and_a_still_frame_is_the_image_worlds_picture():
    rng = random.Random(0)
    for seed in range(30):
        clip = random_clip(rng)
        a, b = render_clip(clip, random.Random(seed)), render_clip(clip, random.Random(seed))
        assert a.fps == b.fps and a.spans == b.spans and np.array_equal(a.frames, b.frames)
        n = len(a.frames)
        assert a.frames.shape == (n, 84, 84, 3) and a.frames.dtype == np.uint8 and 8 <= a.fps <= 15
        assert 2 * a.fps - 1 <= n <= 4 * a.fps + 1 and n >= SAMPLED_FRAMES
        # Before its first event the clip is the image world's picture of the start scene, pixel for pixel.
        assert np.array_equal(a.frames[0], np.asarray(draw_scene(clip.start, 84, random.Random(seed))))
        assert tuple(a.frames[0, 0, 0]) == BACKGROUND_RGB[clip.start.background]
    small = render_clip(clip, random.Random(1), size=30, fps=(10, 10), seconds=(1.6, 1.6))
    assert small.frames.shape == (16, 30, 30, 3) and small.fps == 10
    for kwargs, message in (({"size": 20}, "frame size must be an integer >= 30 pixels, got 20"),
                            ({"fps": (8, 0)}, r"fps must be \(low, high\) integers in \[1, 60\]"),
                            ({"seconds": (3.0, 2.0)}, "low <= high"),
                            ({"fps": (4, 8)}, "must have at least 16 frames, the frames a model samples; got 8")):
        with pytest.raises(InputError, match=message):
            render_clip(clip, random.Random(0), **kwargs)


def test_the_uniform_sampler_sees_every_event():
    # For every clip length and event pair: before/after states each hold >= 4 sampled frames, a glide is seen on its
    # way, and a sampled frame lies between two events.
    rng = random.Random(1)
    start = Shape("circle", "red", "big", 1, 1)
    kinds = {"move": Move(start, "left"), "recolour": Recolour(start, "blue"), "appear": Appear(start),
             "disappear": Disappear(start)}
    durations = Counter()
    for n in range(16, 61):
        picks = sampled_indices(n)
        assert picks == [int((i + 0.5) * n / 16) for i in range(16)]
        for first in kinds:
            for second in (None, *kinds):
                events = (kinds[first],) if second is None else (kinds[first], kinds[second])
                for _ in range(5):
                    fps = rng.randint(8, 15)
                    spans = schedule(events, n, fps, rng)
                    for event, (a, b) in zip(events, spans, strict=True):
                        assert n / 4 <= a < b <= 3 * n / 4, (n, spans)
                        assert sum(p <= a for p in picks) >= 4 and sum(p >= b for p in picks) >= 4
                        if isinstance(event, Move):
                            assert any(a < p < b for p in picks), (n, spans)  # on its way
                        durations[type(event).__name__, b - a == 1] += 1
                    if len(spans) == 2:
                        assert spans[0][1] <= spans[1][0] and any(spans[0][1] <= p <= spans[1][0] for p in picks)
    assert durations["Move", True] == 0 and durations["Appear", False] == durations["Disappear", False] == 0
    assert durations["Recolour", True] > 300 and durations["Recolour", False] > 300  # switches and fades


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_decoded_frames_show_a_move(direction):
    mover = Shape("circle", "red", "big", 1, 1)
    clip = Clip(Scene((mover, Shape("star", "blue", "small", 0, 0)), "light grey"), (Move(mover, direction),))
    frames, _ = seen(clip, seed=len(direction))
    track = np.array([centroid(near(f, "red")) for f in frames])  # (16, 2): y, x
    dr, dc = DIRECTIONS[direction]
    step = track[-1] - track[0]
    assert np.allclose(step, [dr * CELL, dc * CELL], atol=2), step
    assert np.allclose(track[:4], track[0], atol=1) and np.allclose(track[-4:], track[-1], atol=1)
    along = (track - track[0]) @ np.array([dr, dc])  # progress along the direction, px
    assert ((along > 3) & (along < CELL - 3)).any(), along  # a sampled frame shows it on its way
    assert (np.diff(along) >= -1).all()  # it never goes back
    assert np.allclose(centroid(near(frames[0], "blue")), centroid(near(frames[-1], "blue")), atol=1)  # the star stays


def test_decoded_frames_show_colour_changes_appearances_and_disappearances():
    square, star = Shape("square", "green", "big", 0, 1), Shape("star", "orange", "big", 2, 2)
    triangle = Shape("triangle", "yellow", "big", 2, 0)
    for seed in range(6):  # switches and fades, several frame rates and lengths
        clip = Clip(Scene((square, star), BACKGROUNDS[seed % 3]), (Recolour(square, "purple"), Appear(triangle)))
        frames, _ = seen(clip, seed)
        for f in frames[:4]:
            assert np.abs(centre_colour(f, square) - RGB["green"]).max() <= 12
            assert near(in_cell(f, 2, 0), "yellow").sum() == 0
        for f in frames[-4:]:
            assert np.abs(centre_colour(f, square) - RGB["purple"]).max() <= 12
            assert near(in_cell(f, 2, 0), "yellow").sum() > 100
        clip = Clip(Scene((square, star), BACKGROUNDS[seed % 3]), (Disappear(star),))
        frames, _ = seen(clip, seed)
        assert all(near(in_cell(f, 2, 2), "orange").sum() > 100 for f in frames[:4])
        assert all(near(in_cell(f, 2, 2), "orange").sum() == 0 for f in frames[-4:])


def test_every_colour_survives_compression():
    worst = 0
    for i, background in enumerate(BACKGROUNDS):
        for size in ("small", "big"):
            cells = [(0, 0), (0, 2), (2, 0), (2, 2)]
            for shift in (0, 2, 4):
                shapes = tuple(Shape(kind, COLOURS[(j + shift + i) % 6], size, *cells[j])
                               for j, kind in enumerate(SHAPES))
                frames, _ = seen(Clip(Scene(shapes, background), (Disappear(shapes[0]),)), seed=shift)
                worst = max(worst, *(np.abs(centre_colour(frames[-1], s) - RGB[s.colour]).max() for s in shapes[1:]))
    assert worst <= 12, worst  # 5 measured at CRF 15; the nearest two colours of the world are ~100 apart


# --- encoding ---------------------------------------------------------------------------------------------------------


def test_encoding_is_deterministic_and_checks_its_input():
    video = render_clip(random_clip(random.Random(2)), random.Random(2))
    mp4 = encode_mp4(video.frames, video.fps)
    assert encode_mp4(video.frames, video.fps) == mp4 and mp4[4:8] == b"ftyp"
    assert mp4.find(b"moov") < mp4.find(b"mdat")  # +faststart: a player can start before the whole file is read
    assert 1000 < len(mp4) < 20000
    assert encode_mp4(video.frames, video.fps, crf=30) != mp4
    for frames, fps, message in ((video.frames[:, :83, :83], 8, "even height and width.*83 x 83"),
                                 (video.frames.astype(np.float32), 8, "must be a uint8 array"),
                                 (video.frames[..., 0], 8, r"\(n, H, W, 3\)"),
                                 (video.frames, 0, "fps must be an integer in")):
        with pytest.raises(InputError, match=message):
            encode_mp4(frames, fps)
    with pytest.raises(InputError, match=r"crf must be an integer in \[0, 51\]"):
        encode_mp4(video.frames, 8, crf=99)


def test_an_ffmpeg_that_fails_is_said(monkeypatch):
    monkeypatch.setattr("mm_llama.data.world_video.find_ffmpeg", lambda: shutil.which("false"))  # exits 1
    with pytest.raises(InputError, match="could not encode 3 frames of 84 x 84 as H.264"):
        encode_mp4(np.zeros((3, 84, 84, 3), np.uint8), 8)


def test_ffmpeg_is_found_on_the_path_or_in_imageio_ffmpeg(monkeypatch):
    assert find_ffmpeg().endswith("ffmpeg")
    monkeypatch.setattr("mm_llama.data.world_video.shutil.which", lambda name: None)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # not importable
    with pytest.raises(InputError, match="no ffmpeg.*on PATH.*pip install imageio-ffmpeg"):
        find_ffmpeg()
    wheel = types.ModuleType("imageio_ffmpeg")
    wheel.get_ffmpeg_exe = lambda: "/wheel/ffmpeg-linux64"
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", wheel)
    assert find_ffmpeg() == "/wheel/ffmpeg-linux64"


# --- samples and shards -----------------------------------------------------------------------------------------------


def test_shards_are_deterministic_and_hold_mp4_description_and_questions(tmp_path):
    a = synth_video(tmp_path / "a", 6, seed=1, shard_size=4)
    b = synth_video(tmp_path / "b", 6, seed=1, shard_size=4, workers=1)
    c = synth_video(tmp_path / "c", 6, seed=2, shard_size=4)
    assert [p.name for p in a] == ["video-000000.tar", "video-000001.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == WORLD_TOKENIZER.read_bytes()
    samples = members(a)
    assert sorted(samples) == [f"{i:09d}" for i in range(6)]
    for sample in samples.values():
        assert set(sample) == {"mp4", "txt", "json"}
        record = json.loads(sample["json"])
        assert list(record) == ["question", "answer", "type", "follow_ups"] and record["type"] in CLIP_QUESTION_TYPES
        assert len(record["follow_ups"]) <= 3
        for follow_up in record["follow_ups"]:
            assert list(follow_up) == ["question", "answer", "type"] and follow_up["type"] in CLIP_QUESTION_TYPES
        assert len({q["question"] for q in [record, *record["follow_ups"]]}) == 1 + len(record["follow_ups"])
        # The mp4 shows the scene its description starts with, on the 84 x 84 grid.
        reader = decord.VideoReader(io.BytesIO(sample["mp4"]))
        first = reader[0].asnumpy()
        assert first.shape == (84, 84, 3) and len(reader) >= 16
        start = parse_caption(sample["txt"].decode())
        assert start.shapes
        for shape in start.shapes:
            assert near(in_cell(first, shape.row, shape.col), shape.colour, 20).sum() > 10, (shape, sample["txt"])
    for kwargs, message in (({"size": 85}, "size must be even for video"), ({"size": 28}, "size must be an integer"),
                            ({"questions": 0}, "questions must be an integer >= 1"),
                            ({"split": "val"}, "split must be 'train' or 'heldout'"),
                            ({"type_weights": {"motion": -1}}, "finite numbers >= 0"),
                            ({"seconds": (1.0, 2.0)}, "at least 16 frames")):
        with pytest.raises(InputError, match=message):
            synth_video(tmp_path / "bad", 2, **kwargs)
    assert not (tmp_path / "bad").exists()  # said before any work


def test_video_samples_repeat_for_an_rng_state():
    first, again = video_sample(random.Random(3)), video_sample(random.Random(3))
    assert first == again and video_sample(random.Random(4)) != first


def test_train_and_heldout_share_no_start_scene_and_no_sentence(tmp_path):
    strings = {}
    for split, n in (("train", 2000), ("heldout", 700)):
        rng, keys, sentences = random.Random(split), set(), set()
        for _ in range(n):
            clip, text, record = clip_record(rng, split)
            assert split_of_scene(clip.start) == split
            parts = re.split(r"(?<=\.) ", text)
            cut = len(parts) - len(clip.events)
            caption, events = " ".join(parts[:cut]), parts[cut:]
            assert parse_caption(caption).key() == clip.start.key() and len(events) == len(clip.events)
            asked = [q["question"] for q in [record, *record["follow_ups"]]]
            assert all(split_of_sentence(s) == split for s in [caption, *events, *asked])
            keys.add(clip.start.key())
            sentences |= {caption, *events, *asked}
        strings[split] = keys, sentences
        assert len(keys) > 0.6 * n and len(sentences) > n
    (train_keys, train_text), (held_keys, held_text) = strings["train"], strings["heldout"]
    assert not train_keys & held_keys
    assert not train_text & held_text, sorted(train_text & held_text)[:5]
    # And on rendered shards: their descriptions start with scenes of their own split.
    rendered = {}
    for split in ("train", "heldout"):
        texts = [s["txt"].decode() for s in members(synth_video(tmp_path / split, 12, split=split)).values()]
        rendered[split] = {parse_caption(t).key() for t in texts}
        assert {split_of_scene(parse_caption(t)) for t in texts} == {split}
    assert not rendered["train"] & rendered["heldout"] and len(rendered["heldout"]) > 8


def test_question_mix_and_type_weights():
    rng = random.Random(5)
    records = [clip_record(rng)[2] for _ in range(1600)]
    first = Counter(r["type"] for r in records)
    assert set(first) == set(CLIP_QUESTION_TYPES)
    assert all(0.09 < first[t] / 1600 < 0.16 for t in VIDEO_QUESTION_TYPES), first  # 1/8 each
    assert all(0.045 < first[t] / 1600 < 0.10 for t in QUESTION_TYPES), first  # 1/14 each
    follow = Counter(f["type"] for r in records for f in r["follow_ups"])
    assert sum(follow.values()) > 2 * 1600 and set(follow) == set(CLIP_QUESTION_TYPES)
    weighted = [clip_record(rng, type_weights={"motion": 0, "count": 0, "appearance": 3.5})[2] for _ in range(400)]
    types = Counter(t for r in weighted for t in [r["type"], *(f["type"] for f in r["follow_ups"])])
    assert types["motion"] == types["count"] == 0 and types["appearance"] > types["disappearance"]
    assert video_type_weights(None)[:4] == [1.75] * 4 and video_type_weights({"colour": 2})[4] == 2.0
    unknown = r"unknown question type\(s\) \[.jump.\] in the type weights; accepted: motion, colour change, .*, size"
    for weights, message in (({"jump": 2}, unknown), ({"motion": float("inf")}, "finite numbers"),
                             (dict.fromkeys(CLIP_QUESTION_TYPES, 0), "not all 0")):
        with pytest.raises(InputError, match=message):
            video_type_weights(weights)


# --- the command line -------------------------------------------------------------------------------------------------


def test_command_line_synth_video(tmp_path, capsys):
    assert main(["data", "synth", "--kind", "video", "--out", str(tmp_path / "v"), "--n", "20"]) == 0
    assert "wrote 1 shard(s)" in capsys.readouterr().out
    samples = members([tmp_path / "v" / "video-000000.tar"])
    assert len(samples) == 20 and all(set(s) == {"mp4", "txt", "json"} for s in samples.values())
    assert (tmp_path / "v" / "tokenizer.model").is_file()
    assert main(["data", "synth", "--kind", "video", "--out", str(tmp_path / "w"), "--n", "2", "--size", "42",
                 "--questions", "1", "--type-weights", "motion=1,colour change=0", "--split", "heldout"]) == 0
    for sample in members([tmp_path / "w" / "video-000000.tar"]).values():
        record = json.loads(sample["json"])
        assert record["follow_ups"] == [] and record["type"] != "colour change"
        assert decord.VideoReader(io.BytesIO(sample["mp4"]))[0].shape == (42, 42, 3)
    capsys.readouterr()
    for args, message in ((["--size", "85"], "size must be even for video"),
                          (["--type-weights", "jump=2"], r"unknown question type(s) ['jump']"),
                          (["--type-weights", "motion"], "each item must be TYPE=NUMBER")):
        assert main(["data", "synth", "--kind", "video", "--out", str(tmp_path / "x"), "--n", "2", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["data", "synth", "--kind", "movie", "--out", str(tmp_path / "y"), "--n", "2"])
    assert exit_.value.code == 2 and "invalid choice: 'movie'" in capsys.readouterr().err
