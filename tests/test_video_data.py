"""Video shards → batches for stage video-adapter (issue 11): the chat format with `<|video|>`, frames as
`read_video` samples them, deterministic and resumable batches, bad clips skipped and counted."""

import tarfile

import pytest
import torch

from encoders.video import Videos, read_video
from mm_llama.data.pack import write_shards
from mm_llama.data.synth_video import synth_video
from mm_llama.data.video import VideoDataConfig, VideoTextBatches, clip_frames
from mm_llama.errors import ConfigError


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("video")
    assert len(synth_video(out, 24, seed=0, shard_size=12)) == 2
    return out


def config(shards, **kw) -> VideoDataConfig:
    return VideoDataConfig(**{"shards": str(shards), "tokenizer": str(shards / "tokenizer.model"), "tile_size": 84,
                              "max_tiles": 1, "n_frames": 8, "seq_len": 160, "batch_size": 4, "shuffle_buffer": 6,
                              "task": "qa", **kw})


def first_sample(shards):
    with tarfile.open(shards / "video-000000.tar") as tar:
        return {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()
                if m.name.startswith("000000000.")}


def test_a_batch_is_a_chat_about_each_clip(clips):
    source = VideoTextBatches(config(clips))
    batch = next(source.batches())
    videos, tok = batch["videos"], source.tokenizer
    assert isinstance(videos, Videos) and videos.pixel_values.shape == (4, 1, 8, 1, 3, 84, 84)
    assert videos.n_videos == [1, 1, 1, 1] and videos.tile_mask.all()
    for row, labels in zip(batch["tokens"].tolist(), batch["labels"].tolist(), strict=True):
        assert row.count(tok.video_id) == 1 and tok.image_id not in row
        answers = tok.decode([t for t in labels if t != -100])
        assert answers.count("<|eot_id|>") >= 1 and "<|video|>" not in answers


def test_frames_are_those_read_video_samples_at_inference(clips, tmp_path):
    sample = first_sample(clips)
    path = tmp_path / "clip.mp4"
    path.write_bytes(sample["mp4"])
    here = clip_frames(sample["mp4"], 8, 84, 1)
    there = read_video(path, n_frames=8, tile_size=84, max_tiles=1)
    assert here.shape == (8, 84, 84, 3) and (here == there.frames).all()
    assert len(set(there.indices)) == 8  # 2-4 s clips at 8-15 fps: 8 distinct frames, uniformly spread


def test_batches_are_deterministic_and_resume(clips):
    first = list(zip(range(5), VideoTextBatches(config(clips)).batches(), strict=False))
    again = VideoTextBatches(config(clips)).batches(start=3)
    for _, expected in first[3:]:
        got = next(again)
        for key in ("tokens", "labels", "mask"):
            assert torch.equal(got[key], expected[key]), key
        assert torch.equal(got["videos"].pixel_values, expected["videos"].pixel_values)


def test_a_clip_that_does_not_decode_is_skipped_and_counted(clips, tmp_path):
    good = first_sample(clips)
    broken = dict(good, mp4=good["mp4"][: len(good["mp4"]) // 3])
    shards = tmp_path / "shards"
    write_shards(shards, "video", [good, broken, good, good, good, good], shard_size=6, total=6, desc="test")
    (shards / "tokenizer.model").write_bytes((clips / "tokenizer.model").read_bytes())
    source = VideoTextBatches(config(shards, resampled=False, shuffle_buffer=0, max_skip_fraction=0.5))
    batches = list(source.batches())
    assert sum(b["samples"] for b in batches) == 5 and sum(b["skipped"] for b in batches) == 1


def test_config_is_checked(clips):
    with pytest.raises(ConfigError, match="n_frames must be a positive integer"):
        config(clips, n_frames=0)
