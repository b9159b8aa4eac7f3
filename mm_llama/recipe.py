"""`mm-llama recipe demo`: train the embedded demo model from nothing, stage by stage, on the shapes world.

    mm-llama recipe demo --out runs/demo              # data -> lm -> image-adapter -> video-adapter ->
                                                      #   speech-pretrain -> speech-adapter -> model -> eval
    mm-llama recipe demo --out runs/demo --size tiny  # the same steps in a minute on a CPU (CI): proves the plumbing
    mm-llama recipe demo --out runs/video --image-model demo  # the video and speech steps, on a trained image model
    mm-llama recipe demo --out runs/speech --video-model demo # only the speech steps, on a trained video model

Each step is skipped when its result is complete and resumed when it was cut short (a stage from its latest
checkpoint; a data set is regenerated, since it takes seconds), so the recipe can run in pieces: run the same command
again after an interruption. A stage stopped by SIGTERM/SIGINT checkpoints, and the recipe stops with it.

The stages read the configs in `configs/demo/` (`lm.yaml`, `image_adapter.yaml`, `video_adapter.yaml`,
`speech_pretrain.yaml`, `speech_adapter.yaml`) with the data and run folders of `--out` as overrides; the recipe adds
what is its own: the data set sizes and seeds, and for `--size tiny` fewer steps and smaller batches. The result,
`OUT/model`, is a self-contained mm-llama checkpoint in bf16 (what ships in `mm_llama/demo_model`), and
`OUT/eval.json` its `mm-llama eval --suite shapes` report. `OUT/recipe.json` records each step's time. The speech data
need espeak-ng (Debian's `espeak-ng`). The video data need ffmpeg: Debian's, or the `imageio-ffmpeg` package's where
there is none (`mm_llama.data.world_video.find_ffmpeg`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mm_llama.errors import ConfigError, InputError

__all__ = ["RECIPES", "SIZES", "run_recipe"]

_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "demo"


@dataclass(frozen=True)
class Size:
    """What one size of a recipe changes: data set sizes, per-stage overrides, eval questions per type."""

    n_text: int
    n_image: int
    n_video: int
    n_speech: int
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> extra `--section.key=value`
    eval_per_type: int = 50


SIZES = {
    # The shipped model: about 25 minutes on one H200, measured in two runs (16 min for data, lm and image-adapter;
    # 9 min for the video steps), each step's time in the README and the notes of issues 10 and 11.
    "full": Size(n_text=100_000, n_image=60_000, n_video=20_000, n_speech=96_000, eval_per_type=50),
    # CI on 2 CPU cores: every step of the full recipe on the real configs, with a handful of steps.
    "tiny": Size(n_text=400, n_image=300, n_video=24, n_speech=40, eval_per_type=1, overrides={
        "lm": ("--train.steps=4", "--data.batch_size=4", "--data.seq_len=256", "--train.log_every=2",
               "--train.checkpoint_every=2", "--data.num_workers=0", "--data.shuffle_buffer=50"),
        "image-adapter": ("--train.steps=4", "--data.batch_size=4", "--train.log_every=2",
                          "--train.checkpoint_every=2", "--data.num_workers=0", "--data.shuffle_buffer=50"),
        "video-adapter": ("--train.steps=4", "--data.batch_size=2", "--train.log_every=2",
                          "--train.checkpoint_every=2", "--data.num_workers=0", "--data.shuffle_buffer=10"),
        "speech-pretrain": ("--train.steps=4", "--data.batch_size=4", "--train.log_every=2",
                            "--train.checkpoint_every=2", "--data.num_workers=0", "--data.shuffle_buffer=10"),
        "speech-adapter": ("--train.steps=4", "--data.batch_size=4", "--train.log_every=2",
                           "--train.checkpoint_every=2", "--data.num_workers=0", "--data.shuffle_buffer=10"),
    }),
}


def _marker(folder: Path) -> Path:
    return folder / ".complete.json"


def _done(folder: Path, what: dict) -> bool:
    """Whether `folder` holds a finished result made with exactly `what` (a step's parameters)."""
    try:
        return json.loads(_marker(folder).read_text()) == what
    except (OSError, ValueError):
        return False


def _finish(folder: Path, what: dict) -> None:
    _marker(folder).write_text(json.dumps(what))


# The image stage's question mix: the types that need a look-up by place or a comparison of places ("what shape
# is at the top", "what colour is the shape on the left", "is the circle left of the square") twice as often as the
# others. Held-out image QA at one weight each (issue 10, 4,500 steps): shape 76 %, colour 88 % (every error asked
# by place), relative position 68 %, the other four types 98-100 %. The evaluation stays uniform.
IMAGE_TYPE_WEIGHTS = {"colour": 2.0, "shape": 2.0, "relative position": 2.0}


def _synth(kind: str, n: int, seed: int) -> Callable[[Path], str]:
    def step(out: Path) -> str:
        folder = out / "data" / kind
        what = {"kind": kind, "n": n, "seed": seed}
        if kind == "image":  # a folder written with other settings is written again
            from mm_llama.data.synth_image import QUESTIONS_PER_IMAGE

            what |= {"questions": QUESTIONS_PER_IMAGE, "type_weights": IMAGE_TYPE_WEIGHTS}
        if kind == "video":
            from mm_llama.data.synth_video import TIME_SHARE

            what |= {"time_share": TIME_SHARE}
        if kind == "speech":
            from mm_llama.data.synth_speech import SPOKEN_QA_SHARE

            what |= {"spoken_qa_share": SPOKEN_QA_SHARE}
        if _done(folder, what):
            return f"{folder} is complete"
        shutil.rmtree(folder, ignore_errors=True)  # a partial or different set: writing it again takes seconds
        if kind == "text":
            from mm_llama.data.synth_text import synth_text

            synth_text(folder, n, seed=seed)
        elif kind == "video":
            from mm_llama.data.synth_video import synth_video

            synth_video(folder, n, seed=seed)
        elif kind == "speech":
            from mm_llama.data.synth_speech import synth_speech

            synth_speech(folder, n, seed=seed)
        else:
            from mm_llama.data.synth_image import synth_image

            synth_image(folder, n, seed=seed, type_weights=IMAGE_TYPE_WEIGHTS)
        _finish(folder, what)
        return f"wrote {n:,} {kind} samples to {folder}"
    return step


class _Stopped(Exception):
    def __init__(self, signal: int):
        self.signal = signal


def _stage(name: str, config: str, extra: Callable[[Path], list[str]], size: Size) -> Callable[[Path], str]:
    def step(out: Path) -> str:
        from mm_llama.train import run_stage
        from mm_llama.train.checkpoint import latest_checkpoint

        path = _CONFIGS / config
        if not path.is_file():
            raise ConfigError(f"the recipe reads {path}, which is missing: run it from a source checkout of mm-llama "
                              "(git clone), where configs/ sits beside mm_llama/")
        run_dir = out / name.replace("-", "_")
        overrides = [f"--train.out_dir={run_dir}", *extra(out), *size.overrides.get(name, ())]
        resume = latest_checkpoint(run_dir) is not None  # the stage itself says when there is nothing left to train
        result = run_stage(name, str(path), overrides, resume)
        if result.stop_signal:
            raise _Stopped(result.stop_signal)
        return f"checkpoint {latest_checkpoint(run_dir)}"
    return step


def _data_overrides(kind: str) -> Callable[[Path], list[str]]:
    def extra(out: Path) -> list[str]:
        folder = out / "data" / kind
        return [f"--data.shards={folder}", f"--data.tokenizer={folder / 'tokenizer.model'}"]
    return extra


def _trunk_and_data(out: Path) -> list[str]:
    from mm_llama.train.checkpoint import latest_checkpoint

    trunk = latest_checkpoint(out / "lm")
    if trunk is None:
        raise InputError(f"{out / 'lm'} holds no trunk checkpoint: the lm step must run first")
    return [f"--trunk={trunk.resolve()}", *_data_overrides("image")(out)]


def _image_model_and_data(given: str | None) -> Callable[[Path], list[str]]:
    def extra(out: Path) -> list[str]:
        from mm_llama.train.checkpoint import latest_checkpoint

        image_model = given or latest_checkpoint(out / "image_adapter")
        if image_model is None:
            raise InputError(f"{out / 'image_adapter'} holds no checkpoint: the image-adapter step must run first")
        return [f"--image_model={Path(image_model).resolve()}", *_data_overrides("video")(out)]
    return extra


def _speech_pretrain_data(out: Path) -> list[str]:
    return [f"--data.shards={out / 'data' / 'speech'}"]


def _speech_adapter_inputs(given_video_model: str | None) -> Callable[[Path], list[str]]:
    def extra(out: Path) -> list[str]:
        from mm_llama.train.checkpoint import latest_checkpoint

        base = given_video_model or latest_checkpoint(out / "video_adapter")
        encoder = latest_checkpoint(out / "speech_pretrain")
        if base is None:
            raise InputError(f"{out / 'video_adapter'} holds no checkpoint: the video-adapter step must run first")
        if encoder is None:
            raise InputError(f"{out / 'speech_pretrain'} holds no checkpoint: the speech-pretrain step must run first")
        return [f"--base_model={Path(base).resolve()}", f"--pretrained_encoder={encoder.resolve()}",
                *_data_overrides("speech")(out)]
    return extra


def _given_model(name: str | Path, part: str, what: str) -> str:
    """The directory of `name` ("demo" or a path), checked to be an mm-llama checkpoint with `part`
    (`InputError` otherwise): said before any step runs, not after the data are made."""
    from mm_llama.checkpoints.ours import read_index
    from mm_llama.errors import CheckpointError
    from mm_llama.paths import checkpoint_path

    kind = part.replace("_", "-")
    path = checkpoint_path(str(name), f"{what} model")
    if not path.is_dir():
        raise InputError(f"{what} model {name}: no such checkpoint directory (give an mm-llama checkpoint with a "
                         f"{part.replace('_', ' ')}, e.g. a stage {kind} checkpoint, or 'demo')")
    try:
        parts = read_index(path).get("parts", {})
    except CheckpointError as e:
        raise InputError(f"{what} model {name}: {e}") from None
    if part not in parts:
        raise InputError(f"{what} model {name} has no {part.replace('_', ' ')} (parts: "
                         f"{', '.join(sorted(parts)) or 'none'}): the later steps build on a trained {what} model, "
                         f"e.g. a stage {kind} checkpoint")
    return str(path.resolve())


def package_model(checkpoint: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `checkpoint` (e.g. an image-adapter step directory) to `dst` as a self-contained mm-llama checkpoint with
    every floating-point weight in `dtype` (bf16 halves the files; issue 10's note compares its accuracy with fp32)."""
    from mm_llama.checkpoints import export_checkpoint

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = Path(tmp) / "model"
        export_checkpoint(checkpoint, staged)
        for weights in staged.glob("*.safetensors"):
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(weights).items()}
            save_file(tensors, weights)
        for path in staged.iterdir():  # readable by all, as package data must be (the export writes them 0600)
            path.chmod(0o644)
        staged.chmod(0o755)
        shutil.rmtree(dst, ignore_errors=True)
        staged.rename(dst)


def _package(out: Path) -> str:
    from mm_llama.train.checkpoint import latest_checkpoint

    source = latest_checkpoint(out / "speech_adapter")  # the last stage: the whole model
    if source is None:
        raise InputError(f"{out / 'speech_adapter'} holds no checkpoint: the speech-adapter step must run first")
    dst = out / "model"
    what = {"from": str(source.resolve())}
    if _done(dst, what):
        return f"{dst} is complete"
    package_model(source, dst)
    _finish(dst, what)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(dst.glob("*.safetensors")))
    return f"wrote {dst} ({sizes})"


def _evaluate(size: Size) -> Callable[[Path], str]:
    def step(out: Path) -> str:
        from mm_llama.api import Assistant
        from mm_llama.devices import resolve_device, resolve_dtype
        from mm_llama.evaluation.runner import evaluate

        device = resolve_device("auto", "device")  # the GPU the stages trained on, if there is one
        dtype = resolve_dtype("auto", device, "dtype")
        assistant = Assistant.from_pretrained(out / "model", dtype=dtype, device=device)
        report = evaluate(assistant, suite="shapes", n_per_type=size.eval_per_type, seed=0)
        (out / "eval.json").write_text(json.dumps(report.to_json(), indent=1))
        print(report.table(), flush=True)
        return f"wrote {out / 'eval.json'}"
    return step


@dataclass(frozen=True)
class Given:
    """Trained models a run builds on instead of making them (directories, checked)."""

    image: str | None = None
    video: str | None = None


@dataclass(frozen=True)
class Recipe:
    # (title, make: (size, the given models) -> the step); `image_steps` make the image model, which a given image
    # or video model replaces; `video_steps` make the video model, which a given video model replaces.
    steps: tuple[tuple[str, Callable[[Size, Given], Callable[[Path], str]]], ...]
    image_steps: frozenset[str] = frozenset()
    video_steps: frozenset[str] = frozenset()


RECIPES = {
    "demo": Recipe(steps=(
        ("data text", lambda s, _: _synth("text", s.n_text, seed=0)),
        ("data image", lambda s, _: _synth("image", s.n_image, seed=1)),
        ("data video", lambda s, _: _synth("video", s.n_video, seed=2)),
        ("data speech", lambda s, _: _synth("speech", s.n_speech, seed=3)),
        ("lm", lambda s, _: _stage("lm", "lm.yaml", _data_overrides("text"), s)),
        ("image-adapter", lambda s, _: _stage("image-adapter", "image_adapter.yaml", _trunk_and_data, s)),
        ("video-adapter", lambda s, g: _stage("video-adapter", "video_adapter.yaml", _image_model_and_data(g.image),
                                              s)),
        ("speech-pretrain", lambda s, _: _stage("speech-pretrain", "speech_pretrain.yaml", _speech_pretrain_data, s)),
        ("speech-adapter", lambda s, g: _stage("speech-adapter", "speech_adapter.yaml",
                                               _speech_adapter_inputs(g.video), s)),
        ("model", lambda s, _: _package),
        ("eval", lambda s, _: _evaluate(s)),
    ), image_steps=frozenset({"data text", "data image", "lm", "image-adapter"}),
        video_steps=frozenset({"data video", "video-adapter"})),
}


def run_recipe(name: str, out: str | Path, *, size: str = "full", skip_eval: bool = False,
               image_model: str | Path | None = None, video_model: str | Path | None = None) -> int:
    """Run recipe `name` into folder `out`; returns the exit status (128 + signal when a stage was stopped).

    Args:
        name: a key of RECIPES ("demo").
        out: the run folder; an earlier run's folder resumes.
        size: a key of SIZES ("full", "tiny").
        skip_eval: leave out the final evaluation.
        image_model: a trained image model (an mm-llama checkpoint directory with an image adapter, or "demo") to
            build the later stages on, instead of making one: the text and image data, lm and image-adapter steps
            are left out, and the image model's parts reach OUT/model unchanged: how a video part is added to the
            shipped model without retraining its image rows.
        video_model: a trained video model (an mm-llama checkpoint with a video adapter, or "demo") to build the
            speech steps on: the image and video steps are left out too; its parts reach OUT/model unchanged.
    """
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    if size not in SIZES:
        raise InputError(f"unknown recipe size {size!r}; known sizes: {', '.join(SIZES)}")
    if image_model is not None and video_model is not None:
        raise InputError("give an image model or a video model to build on, not both (a video model has its image "
                         "model inside)")
    given = Given(image=None if image_model is None else _given_model(image_model, "image_adapter", "image"),
                  video=None if video_model is None else _given_model(video_model, "video_adapter", "video"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[name]
    skipped = (recipe.image_steps if given.image or given.video else frozenset()) | (
        recipe.video_steps if given.video else frozenset())
    steps = [(title, make(SIZES[size], given)) for title, make in recipe.steps
             if not (skip_eval and title == "eval") and title not in skipped]
    times: dict[str, float] = {}
    for i, (title, step) in enumerate(steps, 1):
        print(f"[recipe {name}] step {i}/{len(steps)}: {title}", flush=True)
        start = time.perf_counter()
        try:
            message = step(out)
        except _Stopped as stopped:
            print(f"[recipe {name}] stopped by signal {stopped.signal} during {title}; run the same command again to "
                  "resume", flush=True)
            return 128 + stopped.signal
        times[title] = round(time.perf_counter() - start, 1)
        print(f"[recipe {name}] {title}: {message} ({times[title]:.0f} s)", flush=True)
    (out / "recipe.json").write_text(json.dumps({"recipe": name, "size": size, "seconds": times}, indent=1))
    print(f"[recipe {name}] done in {sum(times.values()):.0f} s: the model is {out / 'model'}", flush=True)
    return 0
