"""Stage video-adapter on a small image model (issue 11): the loss falls, only the video adapter trains (every other
weight bit-identical), the checkpoint is a model `from_pretrained` loads, a resumed run equals an uninterrupted one,
and the command line runs it."""

import json
import shutil

import pytest
import torch

from adapters.cross_attention import CrossAttentionConfig
from conftest import Crash, crash_after, randomize_, run_mm_llama
from encoders.vision import VisionConfig
from mm_llama.checkpoints import save_mmllama
from mm_llama.config import from_dict
from mm_llama.data.synth_video import synth_video
from mm_llama.data.video import VideoTextBatches
from mm_llama.errors import ConfigError
from mm_llama.llama import LlamaConfig
from mm_llama.media import Media
from mm_llama.model import MMConfig, MMLlama
from mm_llama.tokenizer import Tokenizer
from mm_llama.train.checkpoint import latest_checkpoint
from mm_llama.train.distributed import init_runtime
from mm_llama.train.loop import train
from mm_llama.train.video_adapter import VideoAdapterStage, VideoAdapterStageConfig


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("video")
    synth_video(out, 48, seed=0, shard_size=24)
    return out


@pytest.fixture(scope="module")
def image_model(tmp_path_factory, clips):
    """A small random image model in mm-llama's format (28-px tiles: the 84-px clips' frames, shrunk)."""
    path = tmp_path_factory.mktemp("image") / "model"
    vocab = Tokenizer.from_file(clips / "tokenizer.model").n_words
    config = MMConfig(trunk=LlamaConfig.preset("debug", vocab_size=vocab, n_layers=4),
                      vision=VisionConfig.preset("debug", max_tiles=1), image_adapter=CrossAttentionConfig(n_layers=2))
    torch.manual_seed(0)
    model = randomize_(MMLlama(config), seed=2)
    # Frame tokens at RMS ~0.5 instead of randomize_'s ~4.7: with latents from frames (the default) the effective
    # frames carry the tokens' scale, and at 4.7 the loss hardly fell in 20 steps (6.7 -> 6.0).
    with torch.no_grad():
        model.vision_projection.weight.mul_(0.1)
    save_mmllama(model, path)
    shutil.copy(clips / "tokenizer.model", path / "tokenizer.model")
    return path


ADAPTER = {}  # adapter settings over the defaults (a test may set some)


def stage_for(clips, image_model, run, copy_blocks=False, **train) -> VideoAdapterStage:
    """The stage on the random image model; its video blocks new at gates 0.5 unless `copy_blocks` (the random image
    blocks' gates say nothing about what a video block should add)."""
    data = {"shards": str(clips), "tokenizer": str(clips / "tokenizer.model"), "tile_size": 28, "max_tiles": 1,
            "n_frames": 4, "seq_len": 128, "batch_size": 4, "shuffle_buffer": 8}
    config = from_dict(VideoAdapterStageConfig, {
        "image_model": str(image_model), "adapter": {"n_frames": 4, "group": 2, "gate_init": 0.5, **ADAPTER},
        "data": data, "init_blocks_from_image": copy_blocks,
        "train": {"out_dir": str(run), "steps": 20, "lr": 1e-2, "warmup_steps": 2, "log_every": 5,
                  "checkpoint_every": 20, "device": "cpu", **train}})
    return VideoAdapterStage(config)


def test_loss_falls_and_only_the_video_adapter_trains(clips, image_model, tmp_path):
    stage = stage_for(clips, image_model, tmp_path / "run")
    result = train(stage, stage.config.train)
    losses = [result.losses[s] for s in sorted(result.losses)]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    before = MMLlama.from_pretrained(image_model, dtype=torch.float32).state_dict()
    after = result.model.state_dict()
    assert set(after) - set(before) == {k for k in after if k.startswith("video_adapter.")}
    assert all(torch.equal(after[k], v) for k, v in before.items())  # trunk, ViT, projection, image adapter, media
    # The checkpoint is a model: the same logits, loaded by name, with the trunk found through its reference.
    ckpt = latest_checkpoint(tmp_path / "run")
    index = json.loads((ckpt / "mm_llama.json").read_text())
    assert "video_adapter" in index["parts"] and "checkpoint" in index["trunk"]
    loaded = MMLlama.from_pretrained(ckpt, dtype=torch.float32)
    batch = next(VideoTextBatches(stage.config.data).batches())
    with torch.no_grad():
        logits = [m(batch["tokens"], Media(videos=batch["videos"])) for m in (result.model.eval(), loaded)]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("read_moments", [False, True])
def test_video_blocks_start_as_the_image_blocks_they_sit_with(clips, image_model, tmp_path, monkeypatch,
                                                               read_moments):
    monkeypatch.setitem(ADAPTER, "read_moments", read_moments)
    stage = stage_for(clips, image_model, tmp_path / "run", copy_blocks=True)
    model = stage.build(init_runtime("cpu"))
    (layer,) = model.video_adapter.schedule
    image = model.image_adapter.cross_attention_layers[model.image_adapter.schedule.index(layer)].state_dict()
    video = model.video_adapter.cross_attention_layers[0].state_dict()
    if read_moments:  # the two moments' reads start equally weighted: the mean of two ordinary reads
        assert torch.equal(video.pop("attention.moment_mix"), torch.full((2, 64), 0.5))
    for name, value in video.items():  # gates included: the image block's trained ones, not adapter.gate_init
        assert torch.equal(value, image[name]), name
    assert not torch.equal(video["gate_attn"], torch.full_like(video["gate_attn"], 0.5))


def test_resume_gives_the_same_losses(clips, image_model, tmp_path):
    full = train(s := stage_for(clips, image_model, tmp_path / "full", steps=6, checkpoint_every=2), s.config.train)
    part = crash_after(stage_for(clips, image_model, tmp_path / "part", steps=6, checkpoint_every=2), n_batches=4)
    with pytest.raises(Crash):
        train(part, part.config.train)
    resumed = train(s := stage_for(clips, image_model, tmp_path / "part", steps=6, checkpoint_every=2),
                    s.config.train, resume=True)
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert abs(resumed.losses[step] - full.losses[step]) <= 1e-5, step


def test_config_mismatches_are_clear(clips, image_model, tmp_path):
    with pytest.raises(ConfigError, match=r"data.n_frames \(4\) differs from adapter.n_frames \(8\)"):
        from_dict(VideoAdapterStageConfig, {"image_model": str(image_model), "adapter": {"n_frames": 8, "group": 4},
                                            "data": {"shards": "x", "tokenizer": "y", "n_frames": 4},
                                            "train": {"out_dir": str(tmp_path)}})
    stage = stage_for(clips, image_model, tmp_path / "run")
    stage.config.data.tile_size = 56
    with pytest.raises(ConfigError, match="differ from the image model's encoder"):
        stage.build(init_runtime("cpu"))


def test_command_line(clips, image_model, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "video_adapter.yaml"
    result = run_mm_llama("train", "video-adapter", "--config", str(config), f"--image_model={image_model}",
                          f"--data.shards={clips}", f"--data.tokenizer={clips / 'tokenizer.model'}",
                          "--data.tile_size=28", "--data.num_workers=0", "--data.batch_size=2",
                          f"--train.out_dir={tmp_path / 'run'}", "--train.steps=2", "--train.device=cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "run") is not None


def test_an_image_model_with_a_video_adapter_is_read_without_it(capsys):
    # The embedded model has a video adapter: the stage trains a new one of other sizes in its place (before, its
    # weights were loaded into the new one where they fit, and a size mismatch crashed the build).
    from dataclasses import replace

    from adapters.video import VideoAdapterConfig
    from mm_llama.checkpoints.composed import read_ours_composed
    from mm_llama.paths import checkpoint_path
    from mm_llama.train.base_model import read_base_model

    demo = checkpoint_path("demo")
    base = read_base_model(demo, "image_model demo", "unused", trains=("video_adapter",), announce=True)
    assert capsys.readouterr().out == ("image_model demo has a video adapter already: the stage trains new ones in "
                                       "their place, keeping none of their weights\n")
    assert base.config.video_adapter is None and not any(k.startswith("video_adapter.") for k in base.state)
    adapter = VideoAdapterConfig(n_frames=16, group=4, every=4, ffn_hidden_dim=128)  # the demo's: every 1, FFN 256
    model = base.build(replace(base.config, video_adapter=adapter), torch.device("cpu"), new=("video_adapter",))
    _, demo_state = read_ours_composed(demo)
    built = model.state_dict()
    old = {k: v for k, v in demo_state.items() if k.startswith("video_adapter.")}
    assert any(k not in built or built[k].shape != v.shape for k, v in old.items())  # the old part would not fit
    assert len(model.video_adapter.cross_attention_layers) == 1
    for k, v in demo_state.items():  # every other part is the demo's, bit for bit
        if k not in old:
            assert torch.equal(built[k].to(v.dtype), v), k
    # Off the main rank nothing is said; parts the stage does not train stay (the speech parts here).
    quiet = read_base_model(demo, "image_model demo", "unused", trains=("video_adapter",), announce=False)
    assert capsys.readouterr().out == "" and quiet.config.speech_adapter is not None
