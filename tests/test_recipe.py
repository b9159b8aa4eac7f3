"""`mm-llama recipe demo --size tiny`: every step of the demo recipe on the real configs, end to end on the CPU; a
second run resumes (nothing is redone); what the recipe writes loads, answers and is evaluated."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import run_mm_llama
from mm_llama.api import Assistant
from mm_llama.errors import InputError
from mm_llama.recipe import run_recipe

STEPS = ["data text", "data image", "data video", "data speech", "lm", "image-adapter", "video-adapter",
         "speech-pretrain", "speech-adapter", "model", "eval"]


def mm_llama(*args) -> subprocess.CompletedProcess:
    return run_mm_llama(*args, timeout=600)


def test_tiny_recipe_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "demo"
    first = mm_llama("recipe", "demo", "--out", str(out), "--size", "tiny")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for i, step in enumerate(STEPS, 1):
        assert f"[recipe demo] step {i}/11: {step}" in first.stdout
    times = json.loads((out / "recipe.json").read_text())["seconds"]
    assert list(times) == STEPS and all(t >= 0 for t in times.values())
    # The stages trained on the generated shards, the model is self-contained bf16, and it answers.
    assert (out / "lm" / "checkpoints" / "step_00000004").is_dir()
    assert (out / "image_adapter" / "checkpoints" / "step_00000004").is_dir()
    assert (out / "video_adapter" / "checkpoints" / "step_00000004").is_dir()
    assert (out / "speech_pretrain" / "checkpoints" / "step_00000004").is_dir()
    assert (out / "speech_adapter" / "checkpoints" / "step_00000004").is_dir()
    for f in (out / "model").glob("*.safetensors"):
        with safe_open(f, "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}
    assert {"trunk.safetensors", "video_adapter.safetensors", "speech_encoder.safetensors",
            "speech_adapter.safetensors"} <= {p.name for p in (out / "model").iterdir()}
    answer = Assistant.from_pretrained(out / "model", dtype=torch.float32).ask(
        "How many shapes are there?", image=_a_png(out), max_new_tokens=8)
    assert isinstance(answer, str)
    # The eval table: every (task, type) row and each task's "all" row, one question per type.
    rows = [line.split() for line in first.stdout.splitlines() if line.startswith(("text-qa", "image-qa"))]
    assert len(rows) == 16 and all(r[-4] in ("1", "7") for r in rows)
    report = json.loads((out / "eval.json").read_text())
    assert {t: v["n"] for t, v in report["tasks"].items()} == {"text-qa": 7, "image-qa": 7, "video-qa": 7,
                                                               "video-qa-shuffled": 7, "asr": 2, "spoken-qa": 7}
    assert 0 <= report["tasks"]["asr"]["wer"]

    # Again: every step is complete or has nothing left to train, and no checkpoint is rewritten.
    stamp = (out / "lm" / "checkpoints" / "step_00000004" / "trunk.safetensors").stat().st_mtime_ns
    second = mm_llama("recipe", "demo", "--out", str(out), "--size", "tiny", "--no-eval")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "data text: " + str(out / "data" / "text") + " is complete" in second.stdout
    assert "model: " + str(out / "model") + " is complete" in second.stdout
    assert second.stdout.count("nothing to train") == 5
    assert (out / "lm" / "checkpoints" / "step_00000004" / "trunk.safetensors").stat().st_mtime_ns == stamp
    assert "step 11/11" not in second.stdout and "step 10/10: model" in second.stdout


def _a_png(out: Path):
    """The first image of the generated image shards."""
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(sorted((out / "data" / "image").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        return Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")


def test_unknown_recipe_or_size_names_the_known_ones(tmp_path):
    with pytest.raises(InputError, match="known recipes: demo"):
        run_recipe("video", tmp_path)
    with pytest.raises(InputError, match="known sizes: full, tiny"):
        run_recipe("demo", tmp_path, size="huge")
    bad = mm_llama("recipe", "demo")
    assert bad.returncode == 2 and "--out" in bad.stderr


@pytest.mark.parametrize("given", ["image", "video"])
def test_recipe_on_a_given_model_runs_only_the_later_steps(tmp_path, given):
    out = tmp_path / given
    run = mm_llama("recipe", "demo", "--out", str(out), "--size", "tiny", f"--{given}-model", "demo", "--no-eval")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    later = ["data video", "data speech", "video-adapter", "speech-pretrain", "speech-adapter", "model"]
    if given == "video":
        later = [step for step in later if "video" not in step]
    assert list(json.loads((out / "recipe.json").read_text())["seconds"]) == later
    assert not (out / "lm").exists() and not (out / "data" / "image").exists()
    assert (given == "image") == (out / "video_adapter").exists()
    # The given model's parts pass through unchanged (bf16 in, bf16 out); only the later stages' parts are new.
    from mm_llama.paths import checkpoint_path

    demo = checkpoint_path("demo")
    for part in ("trunk", "vision", "image_adapter") + (("video_adapter",) if given == "video" else ()):
        with safe_open(demo / f"{part}.safetensors", "pt") as a, safe_open(out / "model" / f"{part}.safetensors",
                                                                           "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert {"video_adapter.safetensors", "speech_encoder.safetensors"} <= {p.name for p in (out / "model").iterdir()}


def test_recipe_names_a_missing_or_unfit_image_model(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint directory"):
        run_recipe("demo", tmp_path / "out", image_model=tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="image model .*empty: .*mm_llama.json"):
        run_recipe("demo", tmp_path / "out", image_model=tmp_path / "empty")
    from mm_llama.checkpoints import save_mmllama
    from mm_llama.llama import LlamaConfig
    from mm_llama.model import MMConfig, MMLlama

    save_mmllama(MMLlama(MMConfig(trunk=LlamaConfig.preset("debug"))), tmp_path / "trunk")
    with pytest.raises(InputError, match="has no image adapter"):
        run_recipe("demo", tmp_path / "out", image_model=tmp_path / "trunk")
    with pytest.raises(InputError, match="video model .*trunk has no video adapter"):
        run_recipe("demo", tmp_path / "out", video_model=tmp_path / "trunk")
    with pytest.raises(InputError, match="not both"):
        run_recipe("demo", tmp_path / "out", image_model="demo", video_model="demo")
    assert not (tmp_path / "out").exists()
