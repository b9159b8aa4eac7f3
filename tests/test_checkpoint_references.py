"""An adapter checkpoint refers to its trunk checkpoint (relative path, absolute path, weights fingerprint): it loads
after both run directories move together, a self-contained export loads when copied alone, and a wrong or missing
trunk is a clear error naming what was expected and where it was looked for."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_train_image_adapter import data_config, stage_for

from conftest import randomize_
from mm_llama.checkpoints import (
    convert_checkpoint,
    export_checkpoint,
    load_llama,
    read_checkpoint,
    save_llama,
    trunk_fingerprint,
)
from mm_llama.cli import main
from mm_llama.data.image import ImageTextBatches
from mm_llama.data.synth_image import synth_image
from mm_llama.errors import CheckpointError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.media import Media
from mm_llama.model import MMLlama
from mm_llama.train.checkpoint import latest_checkpoint
from mm_llama.train.loop import train

STEP = "step_00000040"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image")
    synth_image(out, 100, seed=0, shard_size=50)
    return out


@pytest.fixture(scope="module")
def batch(shapes) -> dict:
    return next(ImageTextBatches(data_config(shapes)).batches())


def write_trunk_run(runs: Path, shapes: Path, seed: int) -> Path:
    """A random debug trunk as a stage-lm run would hold it: runs/lm/checkpoints/step_…, tokenizer beside it."""
    torch.manual_seed(seed)
    ckpt = runs / "lm" / "checkpoints" / STEP
    save_llama(randomize_(Llama(LlamaConfig.preset("debug")), seed), ckpt, fmt="ours")
    shutil.copy2(shapes / "tokenizer.model", ckpt / "tokenizer.model")
    return ckpt


@pytest.fixture
def runs(shapes, tmp_path) -> tuple[Path, Path]:
    """(trunk checkpoint, adapter checkpoint): runs/lm and runs/adapter, the adapter trained one step on the trunk."""
    trunk = write_trunk_run(tmp_path / "runs", shapes, seed=0)
    stage = stage_for(shapes, tmp_path / "runs" / "adapter", trunk=trunk, steps=1)
    train(stage, stage.config.train)
    return trunk, latest_checkpoint(tmp_path / "runs" / "adapter")


def logits_of(ckpt: Path, batch: dict) -> torch.Tensor:
    model = MMLlama.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        return model(batch["tokens"], Media(images=batch["images"]))


def trunk_entry(ckpt: Path) -> dict:
    return json.loads((ckpt / "mm_llama.json").read_text())["trunk"]


def set_trunk_entry(ckpt: Path, entry: dict) -> None:
    index = json.loads((ckpt / "mm_llama.json").read_text())
    (ckpt / "mm_llama.json").write_text(json.dumps({**index, "trunk": entry}))


def test_runs_moved_together_still_load(runs, batch, tmp_path):
    trunk, adapter = runs
    before = logits_of(adapter, batch)
    entry = trunk_entry(adapter)
    assert entry["checkpoint"] == f"../../../lm/checkpoints/{STEP}" and entry["absolute"] == str(trunk.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for run in ("lm", "adapter"):
        shutil.move(tmp_path / "runs" / run, elsewhere / run)
    assert not trunk.exists()
    moved = elsewhere / "adapter" / "checkpoints" / adapter.name
    assert torch.equal(logits_of(moved, batch), before)
    # The adapter's run alone moves, the trunk's stays where it was trained on: the absolute path finds it.
    shutil.move(elsewhere / "lm", tmp_path / "runs" / "lm")
    shutil.move(elsewhere / "adapter", tmp_path / "adapter-alone")
    assert torch.equal(logits_of(tmp_path / "adapter-alone" / "checkpoints" / adapter.name, batch), before)


def test_export_copied_alone_loads_and_answers(runs, batch, tmp_path, capsys):
    _, adapter = runs
    before = logits_of(adapter, batch)
    ask = ["--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "4", "How many shapes are there?"]
    assert main(["ask", "--checkpoint", str(adapter), *ask]) == 0
    answer = capsys.readouterr().out
    assert main(["export", "--checkpoint", str(adapter), "--out", str(tmp_path / "export")]) == 0
    assert "self-contained" in capsys.readouterr().out
    entry = trunk_entry(tmp_path / "export")
    assert "checkpoint" not in entry and (tmp_path / "export" / entry["weights"]).is_file()
    far = tmp_path / "far" / "shared-copy"
    shutil.copytree(tmp_path / "export", far)
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(tmp_path / "export")
    assert torch.equal(logits_of(far, batch), before)
    assert main(["ask", "--checkpoint", str(far), *ask]) == 0
    assert capsys.readouterr().out == answer
    # A self-contained checkpoint needs no trunk: giving one is a mistake, said as such.
    with pytest.raises(CheckpointError, match="stores its trunk's weights"):
        export_checkpoint(far, tmp_path / "again", trunk=far)


def test_a_different_trunk_at_the_referenced_path_is_refused(runs, shapes, tmp_path, capsys):
    trunk, adapter = runs
    expected = trunk_entry(adapter)["fingerprint"]
    shutil.rmtree(trunk)
    write_trunk_run(tmp_path / "runs", shapes, seed=1)  # another trunk, same place
    _, config, state = read_checkpoint(trunk)
    found = trunk_fingerprint(state, tie_embeddings=config.tie_embeddings)
    assert found != expected
    with pytest.raises(CheckpointError) as error:
        MMLlama.from_pretrained(adapter)
    message = str(error.value)
    assert expected in message and f"{trunk.resolve()} (different weights: fingerprint {found})" in message
    assert "mm-llama export" in message
    assert main(["ask", "--checkpoint", str(adapter), "--device", "cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm-llama: error: ") and expected in err and "Traceback" not in err
    # --trunk is verified too: the wrong trunk given explicitly is refused, and nothing is written.
    assert main(["export", "--checkpoint", str(adapter), "--trunk", str(trunk), "--out", str(tmp_path / "x")]) == 2
    assert "different weights" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_missing_trunk_names_where_it_looked_and_export_takes_it_explicitly(runs, batch, tmp_path, capsys):
    trunk, adapter = runs
    before = logits_of(adapter, batch)
    # The adapter's run moved, and the trunk's step left its run (say, its keep_checkpoints rotation deleted it).
    shutil.move(tmp_path / "runs" / "adapter", tmp_path / "moved")
    shutil.move(trunk, tmp_path / "kept")
    moved = tmp_path / "moved" / "checkpoints" / adapter.name
    relative = (tmp_path / "lm" / "checkpoints" / STEP).resolve()  # what the relative path points at now
    with pytest.raises(CheckpointError) as error:
        MMLlama.from_pretrained(moved)
    message = str(error.value)
    assert str(moved / "mm_llama.json") in message and trunk_entry(moved)["fingerprint"] in message
    assert f"{relative} (missing)" in message and f"{trunk.resolve()} (missing)" in message
    assert "keep_checkpoints" in message and "--trunk" in message
    assert main(["ask", "--checkpoint", str(moved), "--device", "cpu", "hi"]) == 2
    assert f"{relative} (missing)" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(moved), "--trunk", str(tmp_path / "kept"),
                 "--out", str(tmp_path / "export")]) == 0
    assert str((tmp_path / "kept").resolve()) in capsys.readouterr().out
    assert torch.equal(logits_of(tmp_path / "export", batch), before)


def test_references_written_before_fingerprints_still_load(runs, batch, tmp_path):
    trunk, adapter = runs
    before = logits_of(adapter, batch)
    set_trunk_entry(adapter, {"checkpoint": str(trunk.resolve())})  # how the stage wrote them before
    assert torch.equal(logits_of(adapter, batch), before)
    set_trunk_entry(adapter, {"checkpoint": os.path.relpath(trunk, adapter)})
    assert torch.equal(logits_of(adapter, batch), before)
    shutil.move(trunk, tmp_path / "kept")
    with pytest.raises(CheckpointError, match=r"written without a fingerprint.*\(missing\)"):
        MMLlama.from_pretrained(adapter)
    # Unverified (nothing to verify against), but it loads.
    export_checkpoint(adapter, tmp_path / "export", trunk=tmp_path / "kept")
    assert torch.equal(logits_of(tmp_path / "export", batch), before)


def test_fingerprint_ignores_dtype_and_format_but_not_the_weights(tmp_path):
    model = randomize_(Llama(LlamaConfig.preset("debug")), seed=3)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    expected = trunk_fingerprint(state, tie_embeddings=False)
    assert expected.startswith("sha256-bf16-3x1024:") and len(expected.split(":")[1]) == 64
    save_llama(model, tmp_path / "meta", fmt="meta")
    convert_checkpoint(tmp_path / "meta", tmp_path / "hf", to="hf")  # wq/wk permuted on disk, HF names
    save_llama(load_llama(tmp_path / "hf", dtype=torch.bfloat16), tmp_path / "bf16", fmt="ours")
    for path in ("meta", "hf", "bf16"):
        fmt, config, read = read_checkpoint(tmp_path / path)
        assert trunk_fingerprint(read, tie_embeddings=config.tie_embeddings) == expected, fmt
    assert read["layers.0.attention.wq.weight"].dtype == torch.bfloat16

    def changed(key: str, index: int, delta: float = 1.0) -> str:
        other = dict(state)
        other[key] = state[key].clone()
        other[key].view(-1)[index] += delta
        return trunk_fingerprint(other, tie_embeddings=False)

    assert changed("layers.1.feed_forward.w2.weight", 0) != expected  # one tensor changed in a sampled window
    assert changed("norm.weight", 40) != expected  # a small tensor is hashed whole
    g = torch.Generator().manual_seed(0)
    further = {k: v * (1 + 1e-3 * torch.randn(v.shape, generator=g)) for k, v in state.items()}  # "trained on"
    assert trunk_fingerprint(further, tie_embeddings=False) != expected
    # What it does not see (documented): a value outside the three windows of a large tensor (32,768 elements).
    assert changed("tok_embeddings.weight", 5000) == expected
    # A tied head is left out, whether a format stores the copy or not.
    tied = {k: v for k, v in state.items() if k != "output.weight"}
    assert trunk_fingerprint({**tied, "output.weight": tied["tok_embeddings.weight"]}, tie_embeddings=True) == \
        trunk_fingerprint(tied, tie_embeddings=True)
