"""Stage `vision-pretrain` on the debug ViT and a tiny random open_clip text tower (CPU, fp32): shapes-world
image-caption batches, contrastive loss falls, retrieval improves, the `vision` part reloads into a VisionEncoder,
the temperature stays clamped, resume matches, bad samples are skipped."""

import io
import math
import re
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import Crash, crash_after
from encoders.vision import VisionEncoder
from mm_llama.checkpoints.ours import read_index, read_ours_parts
from mm_llama.config import from_dict
from mm_llama.data.image import ImageDataConfig
from mm_llama.data.image_text import ImageCaptionBatches
from mm_llama.data.synth_image import synth_image
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.train.checkpoint import latest_checkpoint
from mm_llama.train.distributed import init_runtime
from mm_llama.train.loop import train
from mm_llama.train.vision_pretrain import MAX_LOGIT_SCALE, VisionPretrainStage, VisionPretrainStageConfig

TINY_TEXT = {"width": 64, "heads": 2, "layers": 2}  # ViT-S-32's text tower (12 x 384) shrunk for speed


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image")
    assert len(synth_image(out, 64, seed=0, shard_size=32)) == 2
    return out


def data_config(shards, **kw) -> ImageDataConfig:
    return ImageDataConfig(**{"shards": str(shards), "tokenizer": str(shards / "tokenizer.model"), "tile_size": 56,
                              "max_tiles": 1, "batch_size": 16, "shuffle_buffer": 32, "task": "caption", **kw})


def stage_config(shapes, run, **train) -> dict:
    return {"vision": {"preset": "debug", "tile_size": 56, "max_tiles": 1}, "text_model": "ViT-S-32",
            "text_cfg": TINY_TEXT, "embed_dim": 32, "data": vars(data_config(shapes)),
            "train": {"out_dir": str(run), "steps": 40, "lr": 2e-3, "warmup_steps": 10, "weight_decay": 0.0,
                      "log_every": 10, "checkpoint_every": 40, "device": "cpu", **train}}


def stage_for(shapes, run, **train) -> VisionPretrainStage:
    return VisionPretrainStage(from_dict(VisionPretrainStageConfig, stage_config(shapes, run, **train)))


def retrieval(model, batch) -> float:
    """Top-1 accuracy of image → caption over the batch."""
    with torch.no_grad():
        image, text, _ = model(batch["images"].pixel_values, batch["images"].aspect_ratio_ids, batch["text"])
    return ((image @ text.T).argmax(dim=1) == torch.arange(len(image))).float().mean().item()


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    stage = stage_for(shapes, run)
    runtime = init_runtime("cpu")
    torch.manual_seed(stage.config.train.seed)  # the loop's seed: the same initial weights
    initial = stage.build(runtime).eval()
    batch = next(stage.batches(runtime, 0))
    return stage, initial, batch, train(stage, stage.config.train), run


def test_caption_batches_are_deterministic_and_resume(shapes):
    stream = ImageCaptionBatches(data_config(shapes)).batches()
    first = [next(stream) for _ in range(6)]
    images = first[0]["images"]
    assert images.pixel_values.shape == (16, 1, 1, 3, 56, 56) and images.aspect_ratio_ids.shape == (16, 1)
    assert len(first[0]["captions"]) == 16 and all(re.search(r"\b(small|big) \w+ (circle|square|triangle|star)\b", c)
                                                  for c in first[0]["captions"])
    again = ImageCaptionBatches(data_config(shapes)).batches(start=4)
    for expected in first[4:]:
        got = next(again)
        assert torch.equal(got["images"].pixel_values, expected["images"].pixel_values)
        assert got["captions"] == expected["captions"]
    with pytest.raises(ConfigError, match="data.task"):
        ImageCaptionBatches(data_config(shapes, task="mixed"))


def test_an_undecodable_image_or_a_missing_caption_is_skipped_and_counted(shapes, tmp_path):
    with tarfile.open(shapes / "image-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as out:
        for member, data in members:
            if member.name == "000000025.txt":
                continue
            if member.name == "000000029.png":
                data = b"\x89PNG not really" + bytes(100)
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    config = data_config(tmp_path / "bad-000000.tar", resampled=False, shuffle_buffer=0, batch_size=10,
                         max_skip_fraction=0.1)
    batches = list(ImageCaptionBatches(config).batches())
    assert sum(b["samples"] for b in batches) == 30 and sum(b["skipped"] for b in batches) == 2


def test_loss_falls_and_retrieval_improves(trained):
    stage, initial, batch, result, _ = trained
    losses = result.losses
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.4 and last < math.log(16) - 0.2, (first, last)  # below chance level, ln(batch size)
    before, after = retrieval(initial, batch), retrieval(result.model.eval(), batch)
    assert after > 1 / 16 and after > before, (before, after)


def test_vision_part_loads_into_a_fresh_encoder(trained):
    stage, _, batch, result, run = trained
    ckpt = latest_checkpoint(run)
    assert sorted(read_index(ckpt)["parts"]) == ["clip_heads", "vision"]
    parts = read_ours_parts(ckpt)
    vision_config, vision_state = parts["vision"]
    assert all(k.startswith("vision.") for k in vision_state)
    assert any(k.startswith("clip.transformer.") for k in parts["clip_heads"][1]) and "clip.logit_scale" in parts[
        "clip_heads"][1] and not any(k.startswith("clip.visual.") for k in parts["clip_heads"][1])
    torch.manual_seed(123)
    encoder = VisionEncoder(stage.config.vision.from_dict(vision_config))
    encoder.load_state_dict({k.removeprefix("vision."): v for k, v in vision_state.items()}, strict=True)
    with torch.no_grad():
        expected = result.model.vision(batch["images"].pixel_values, batch["images"].aspect_ratio_ids)
        assert torch.equal(encoder.eval()(batch["images"].pixel_values, batch["images"].aspect_ratio_ids), expected)
    # stage.load gives back every trainable tensor by name
    assert sorted(stage.load(ckpt)) == sorted(n for n, p in result.model.named_parameters() if p.requires_grad)


def test_logit_scale_is_learnt_and_clamped(trained):
    _, initial, batch, result, _ = trained
    assert initial.clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert result.model.clip.logit_scale.requires_grad and result.model.clip.logit_scale.item() != pytest.approx(
        math.log(1 / 0.07))
    with torch.no_grad():
        initial.clip.logit_scale.fill_(math.log(1000))
        _, _, scale = initial(batch["images"].pixel_values, batch["images"].aspect_ratio_ids, batch["text"])
    assert scale.item() == pytest.approx(100) and MAX_LOGIT_SCALE == pytest.approx(math.log(100))


def test_resume_through_the_loop_gives_the_same_losses(shapes, tmp_path):
    full = train(s := stage_for(shapes, tmp_path / "full", steps=6, checkpoint_every=2), s.config.train)
    # The process dies during step 5 (after the checkpoint of step 4).
    part = crash_after(stage_for(shapes, tmp_path / "part", steps=6, checkpoint_every=2), n_batches=4)
    with pytest.raises(Crash):
        train(part, part.config.train)
    resumed = train(s := stage_for(shapes, tmp_path / "part", steps=6, checkpoint_every=2), s.config.train,
                    resume=True)
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert abs(resumed.losses[step] - full.losses[step]) <= 1e-5, step


def test_config_errors_are_explicit(shapes, tmp_path):
    bad = stage_config(shapes, tmp_path)
    with pytest.raises(ConfigError, match="text_pretrained"):
        from_dict(VisionPretrainStageConfig, {**bad, "text_pretrained": "laion2b_s34b_b79k"})
    with pytest.raises(ConfigError, match="init_pretrained"):
        from_dict(VisionPretrainStageConfig, {**bad, "init_from_open_clip": "ViT-H-14"})
    with pytest.raises(ConfigError, match="data.tile_size"):
        from_dict(VisionPretrainStageConfig, {**bad, "vision": {"preset": "debug"}})


def test_demo_config_loads():
    from mm_llama.config import load_config

    config = load_config(VisionPretrainStageConfig, Path(__file__).resolve().parents[1] / "configs" / "demo" /
                         "vision_pretrain.yaml")
    assert config.text_pretrained is None and config.data.task == "caption" and config.vision.tile_size == 84


def test_image_adapter_starts_from_the_pretrained_vit(trained, shapes, tmp_path):
    from mm_llama.config import from_dict as load_dict
    from mm_llama.train.image_adapter import ImageAdapterStage, ImageAdapterStageConfig

    _, _, _, result, run = trained
    ckpt = latest_checkpoint(run)
    config = load_dict(ImageAdapterStageConfig, {
        "trunk_preset": "debug", "vision": {"preset": "debug", "tile_size": 56, "max_tiles": 1},
        "adapter": {"n_layers": 1}, "init_vision": str(ckpt), "data": {**vars(data_config(shapes)), "task": "qa"},
        "train": {"out_dir": str(tmp_path / "adapter"), "device": "cpu"}})
    model = ImageAdapterStage(config).build(init_runtime("cpu"))
    pretrained = result.model.vision.state_dict()
    assert all(torch.equal(v, pretrained[k]) for k, v in model.vision.state_dict().items())
    bad = load_dict(ImageAdapterStageConfig, {**vars(config), "vision": {"preset": "debug", "tile_size": 56,
                                                                           "max_tiles": 1, "width": 48},
                                              "adapter": {"n_layers": 1}, "data": vars(config.data),
                                              "train": vars(config.train)})
    with pytest.raises(CheckpointError, match="does not fit the vision config"):
        ImageAdapterStage(bad).build(init_runtime("cpu"))
