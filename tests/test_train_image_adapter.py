"""Stage `image-adapter` on the debug trunk and debug ViT (CPU, fp32): shapes-world data, answer-only labels, loss
falls, frozen trunk (and ViT) bit-identical, checkpoints reload by name, resumable data, bad images skipped."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import Crash, crash_after
from mm_llama.config import from_dict
from mm_llama.data.image import CAPTION_PROMPT, ImageDataConfig, ImageTextBatches
from mm_llama.data.synth_image import synth_image
from mm_llama.tokenizer import Tokenizer
from mm_llama.train.checkpoint import latest_checkpoint
from mm_llama.train.distributed import init_runtime
from mm_llama.train.image_adapter import ImageAdapterStage, ImageAdapterStageConfig
from mm_llama.train.loop import train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image")
    assert len(synth_image(out, 200, seed=0, shard_size=50)) == 4
    return out


def data_config(shards, **kw) -> ImageDataConfig:
    return ImageDataConfig(**{"shards": str(shards), "tokenizer": str(shards / "tokenizer.model"),
                              "tile_size": 28, "max_tiles": 4, "seq_len": 128, "batch_size": 8,
                              "shuffle_buffer": 50, **kw})


@pytest.fixture(scope="module")
def lm_trunk(tmp_path_factory) -> Path:
    """A debug trunk that has learnt the shapes-world language (stage lm, ~40 steps)."""
    from mm_llama.data.synth_text import synth_text
    from mm_llama.llama import LlamaConfig
    from mm_llama.train.lm import LMStage, LMStageConfig

    corpus, run = tmp_path_factory.mktemp("text"), tmp_path_factory.mktemp("lm")
    synth_text(corpus, 800, seed=0, shard_size=200)
    data = {"shards": str(corpus), "tokenizer": str(corpus / "tokenizer.model"), "seq_len": 64, "shuffle_buffer": 50}
    config = from_dict(LMStageConfig, {"model": vars(LlamaConfig.preset("debug")), "data": data, "train": {
        "out_dir": str(run), "steps": 40, "lr": 3e-3, "warmup_steps": 3, "checkpoint_every": 40, "device": "cpu"}})
    train(LMStage(config), config.train)
    return latest_checkpoint(run)


def stage_for(shapes, run, *, trunk=None, train_vision=True, **train) -> ImageAdapterStage:
    data = {k: v for k, v in vars(data_config(shapes)).items()}
    trunk_source = {"trunk": str(trunk)} if trunk else {"trunk_preset": "debug"}
    config = from_dict(ImageAdapterStageConfig, {
        **trunk_source, "vision": "debug", "adapter": {"n_layers": 2}, "train_vision": train_vision,
        "data": data, "train": {"out_dir": str(run), "steps": 25, "lr": 1e-2, "warmup_steps": 3, "log_every": 5,
                                "checkpoint_every": 25, "device": "cpu", **train}})
    return ImageAdapterStage(config)


def test_synth_is_deterministic_and_needs_the_image(shapes, tmp_path):
    synth_image(tmp_path, 200, seed=0, shard_size=50)
    assert (tmp_path / "image-000002.tar").read_bytes() == (shapes / "image-000002.tar").read_bytes()
    with tarfile.open(shapes / "image-000000.tar") as tar:
        names = tar.getnames()
        qa = json.loads(tar.extractfile("000000003.json").read())
        png = tar.extractfile("000000003.png").read()
    assert names[:3] == ["000000000.json", "000000000.png", "000000000.txt"]
    assert set(qa) == {"question", "answer", "type", "follow_ups"} and qa["question"].endswith("?")
    assert 1 <= len(qa["follow_ups"]) <= 3 and all(set(f) == {"question", "answer", "type"} for f in qa["follow_ups"])
    assert len({qa["question"], *(f["question"] for f in qa["follow_ups"])}) == 1 + len(qa["follow_ups"])
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size == (84, 84)


def answer_runs(tokens: list[int], tok: Tokenizer) -> list[range]:
    """Each assistant answer's positions with its <|eot_id|> (the last may be cut by the row's end)."""
    header, runs = tok.encode_header("assistant"), []
    for i in range(len(tokens) - len(header) + 1):
        if tokens[i : i + len(header)] == header:
            start = i + len(header)
            end = next((j + 1 for j in range(start, len(tokens)) if tokens[j] == tok.eot_id), len(tokens))
            runs.append(range(start, end))
    return runs


def test_labels_cover_exactly_the_answers(shapes):
    source = ImageTextBatches(data_config(shapes, task="qa", seq_len=512))
    tok = source.tokenizer
    batch = next(source.batches())
    images = batch["images"]
    assert images.pixel_values.shape == (8, 1, 4, 3, 28, 28) and images.aspect_ratio_ids.shape == (8, 1)
    assert images.n_images == [1] * 8 and images.tile_mask.shape == (8, 1, 4)
    turns = []
    for tokens, mask, labels in zip(batch["tokens"], batch["mask"], batch["labels"], strict=True):
        assert (tokens == tok.image_id).sum() == 1 and not (labels == tok.image_id).any()
        assert (tokens[~mask] == tok.pad_id).all() and (labels[~mask] == -100).all()
        runs = answer_runs(tokens[mask].tolist(), tok)
        on = [i for run in runs for i in run]
        assert (labels != -100).nonzero().flatten().tolist() == on  # the answers, and nothing else
        assert torch.equal(labels[on], tokens[on]) and all(tokens[run[-1]] == tok.eot_id for run in runs)
        # the image opens the first user turn; the follow-ups are later user turns, each answered in turn
        text = tok.decode(tokens[mask].tolist())
        assert text.count("<|start_header_id|>user<|end_header_id|>\n\n") == len(runs)
        assert text.index("<|image|>") < text.index("<|start_header_id|>assistant")
        turns.append(len(runs))
    assert min(turns) >= 1 and max(turns) == 4 and sum(turns) >= 20  # synth asks up to 4 questions a picture
    cut = next(ImageTextBatches(data_config(shapes, task="qa", seq_len=40)).batches())
    assert cut["tokens"].shape[1] == 40 and (cut["labels"] != -100).any()  # a long chat is cut at seq_len
    captions = next(ImageTextBatches(data_config(shapes, task="caption")).batches())
    assert all(CAPTION_PROMPT in tok.decode(row.tolist()) for row in captions["tokens"])
    assert all(len(answer_runs(row[m].tolist(), tok)) == 1
               for row, m in zip(captions["tokens"], captions["mask"], strict=True))


@pytest.mark.parametrize(("record", "message"), [
    ([1], "'json' must be an object with 'question' and 'answer', got list"),
    ({"question": "Q?"}, "'json' must hold non-empty strings"),
    ({"question": "Q?", "answer": "A.", "follow_ups": {"question": "R?"}}, "'follow_ups' must be a list"),
    ({"question": "Q?", "answer": "A.", "follow_ups": [{"question": "R?", "answer": ""}]},
     r"follow_ups\[0\] must hold non-empty strings"),
])  # fmt: skip
def test_a_bad_question_record_is_a_bad_sample_naming_its_fault(shapes, record, message):
    from mm_llama.data.image import _Decode
    from mm_llama.data.pipeline import BadSample

    with tarfile.open(shapes / "image-000000.tar") as tar:
        png = tar.extractfile("000000000.png").read()
    decode = _Decode("qa", seed=0)
    with pytest.raises(BadSample, match=message) as info:
        decode({"__key__": "k9", "png": png, "json": json.dumps(record).encode()})
    assert "sample k9" in str(info.value)
    one = decode({"__key__": "k9", "png": png, "json": b'{"question": "Q?", "answer": "A."}'})
    assert one.turns == (("Q?", "A."),)  # follow_ups are optional: a single question is one turn


def test_a_chat_row_is_the_chat_format_of_its_turns(shapes):
    from encoders.image_transform import ImageTransform, ImageTransformConfig
    from mm_llama.data.image import _Decode, _Prepare

    tok = Tokenizer.from_file(shapes / "tokenizer.model")
    with tarfile.open(shapes / "image-000000.tar") as tar:
        png = tar.extractfile("000000000.png").read()
    record = {"question": " What shape is at the top? ", "answer": "It is a star.",
              "follow_ups": [{"question": "Is it big?", "answer": "No."}, {"question": "And?", "answer": "Red."}]}
    chat = _Decode("qa", seed=0)({"__key__": "k", "png": png, "json": json.dumps(record).encode()})
    prepare = _Prepare(tok, ImageTransform(ImageTransformConfig(tile_size=28, max_tiles=4)), seq_len=512)
    row = prepare(chat)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is at the top?"}]},
                {"role": "assistant", "content": "It is a star."}, {"role": "user", "content": "Is it big?"},
                {"role": "assistant", "content": "No."}, {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "Red."}]
    assert row.tokens == tok.encode_dialog(messages, add_generation_prompt=False)
    assert tok.decode([t for t in row.labels if t != -100]) == "It is a star.<|eot_id|>No.<|eot_id|>Red.<|eot_id|>"
    cut = _Prepare(tok, prepare.transform, seq_len=30)(chat)
    assert cut.tokens == row.tokens[:30] and cut.labels == row.labels[:30]


def test_batches_are_deterministic_and_resume(shapes):
    source = ImageTextBatches(data_config(shapes))
    stream = source.batches()
    first = [next(stream) for _ in range(6)]
    again = ImageTextBatches(data_config(shapes)).batches(start=4)
    for expected in first[4:]:
        got = next(again)
        for key in ("tokens", "mask", "labels"):
            assert torch.equal(got[key], expected[key]), key
        for key in ("pixel_values", "aspect_ratio_ids", "tile_mask"):
            assert torch.equal(getattr(got["images"], key), getattr(expected["images"], key)), key
    tok = source.tokenizer
    prompts = {tok.decode(b["tokens"][i].tolist()).count(CAPTION_PROMPT) for b in first for i in range(8)}
    assert prompts == {0, 1}  # mixed: both questions and captions


def test_a_worker_delivers_exactly_the_in_process_batches(shapes):
    # One worker reads the same seeded stream as the main process would; its tensors travel packed as numpy arrays
    # (pipeline._Packed) and must arrive as the same tensors.
    def take(num_workers):
        stream = ImageTextBatches(data_config(shapes, num_workers=num_workers)).batches(start=2)
        return [next(stream) for _ in range(3)]

    for got, expected in zip(take(1), take(0), strict=True):
        for key in ("tokens", "mask", "labels"):
            assert torch.equal(got[key], expected[key]), key
        for key in ("pixel_values", "aspect_ratio_ids", "tile_mask"):
            value = getattr(got["images"], key)
            assert isinstance(value, torch.Tensor) and torch.equal(value, getattr(expected["images"], key)), key


def test_an_undecodable_image_is_skipped_and_counted(shapes, tmp_path):
    with tarfile.open(shapes / "image-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as out:
        for member, data in members:
            if member.name == "000000007.png":
                data = b"\x89PNG not really" + bytes(100)
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    config = data_config(tmp_path / "bad-000000.tar", tokenizer=str(shapes / "tokenizer.model"), resampled=False,
                         shuffle_buffer=0, batch_size=10, max_skip_fraction=0.05)
    batches = list(ImageTextBatches(config).batches())
    assert sum(b["samples"] for b in batches) == 49 and sum(b["skipped"] for b in batches) == 1


def _first_png(shards: Path):
    from PIL import Image

    with tarfile.open(shards / "image-000000.tar") as tar:
        return Image.open(io.BytesIO(tar.extractfile("000000000.png").read())).convert("RGB")


def first_and_last(losses: dict[int, float]) -> tuple[float, float]:
    return sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(21, 26)) / 5


def test_a_trunk_checkpoint_is_stored_by_reference(shapes, lm_trunk, tmp_path):
    stage = stage_for(shapes, tmp_path / "run", trunk=lm_trunk, steps=3, lr=3e-3)
    losses = train(stage, stage.config.train).losses
    assert all(2.0 < v < 3.5 for v in losses.values()), losses  # the trunk already speaks the language (~2.4)
    ckpt = latest_checkpoint(tmp_path / "run")
    index = json.loads((ckpt / "mm_llama.json").read_text())
    assert not (ckpt / "trunk.safetensors").exists()
    from mm_llama.checkpoints import read_checkpoint, trunk_fingerprint

    _, config, trunk_state = read_checkpoint(lm_trunk)
    assert index["trunk"] == {"checkpoint": os.path.relpath(lm_trunk.resolve(), ckpt.resolve()),
                              "absolute": str(lm_trunk.resolve()),
                              "fingerprint": trunk_fingerprint(trunk_state, tie_embeddings=config.tie_embeddings)}


def test_stage_checkpoint_is_a_model_from_pretrained_loads(shapes, lm_trunk, tmp_path):
    from mm_llama.media import Media
    from mm_llama.model import MMLlama

    stage = stage_for(shapes, tmp_path / "run", trunk=lm_trunk, steps=2)
    result = train(stage, stage.config.train)
    ckpt = latest_checkpoint(tmp_path / "run")
    model = MMLlama.from_pretrained(ckpt, dtype=torch.float32)
    batch = next(ImageTextBatches(data_config(shapes)).batches())
    with torch.no_grad():
        logits = [m(batch["tokens"], Media(images=batch["images"])) for m in (result.model.eval(), model)]
    assert torch.equal(logits[0], logits[1])
    index = json.loads((ckpt / "mm_llama.json").read_text())
    assert set(index["parts"]) == {"vision", "vision_projection", "image_adapter", "media"}
    # It answers questions with the tokenizer stored beside it (no tokenizer lives on the model).
    answer = model.ask("How many shapes are there?", image=_first_png(shapes), max_new_tokens=4)
    assert isinstance(answer, str) and not hasattr(model, "tokenizer")


def test_loss_falls_and_frozen_parts_stay_bit_identical(shapes, tmp_path):
    stage = stage_for(shapes, tmp_path / "run")
    result = train(stage, stage.config.train)
    first, last = first_and_last(result.losses)
    # A random frozen trunk caps how far the adapter can move its logits, so only a modest fall.
    assert first > 5.5 and last < first - 0.4, (first, last)
    torch.manual_seed(stage.config.train.seed)  # the loop's seed: the same initial weights
    initial = ImageAdapterStage(stage.config).build(init_runtime("cpu")).state_dict()
    for name, value in result.model.state_dict().items():
        same = torch.equal(value, initial[name])
        assert same == name.startswith("trunk."), name
    # The checkpoint reloads by name into a fresh model: identical logits.
    ckpt = latest_checkpoint(tmp_path / "run")
    torch.manual_seed(123)  # a different init: every weight must come from the checkpoint or the preset's seed
    fresh = ImageAdapterStage(stage.config)
    model = fresh.build(init_runtime("cpu"))
    from mm_llama.checkpoints.ours import read_ours_trunk

    _, trunk = read_ours_trunk(ckpt)
    model.trunk.load_state_dict(trunk)
    missing, unexpected = model.load_state_dict(fresh.load(ckpt), strict=False)
    assert not unexpected and all(k.startswith("trunk.") for k in missing)
    batch = next(stage.batches(init_runtime("cpu"), 0))
    with torch.no_grad():
        assert torch.equal(fresh.loss(model, batch), stage.loss(result.model, batch))
    assert (ckpt / "tokenizer.model").is_file() and Tokenizer.from_file(ckpt / "tokenizer.model").n_words == 768


def test_frozen_vision_stays_bit_identical(shapes, tmp_path):
    stage = stage_for(shapes, tmp_path / "run", train_vision=False, steps=4)
    result = train(stage, stage.config.train)
    torch.manual_seed(stage.config.train.seed)
    initial = ImageAdapterStage(stage.config).build(init_runtime("cpu")).state_dict()
    for name, value in result.model.state_dict().items():
        frozen = name.startswith(("trunk.", "vision."))
        assert torch.equal(value, initial[name]) == frozen, name
    ckpt = latest_checkpoint(tmp_path / "run")
    assert not any(k.startswith("vision.") for k in stage.load(ckpt))  # only trainable weights come back
    from mm_llama.checkpoints.ours import read_index, read_safetensors

    parts = read_index(ckpt)["parts"]
    vision = read_safetensors(ckpt / parts["vision"]["weights"])  # MMLlama's full names
    assert vision and all(torch.equal(v, initial[k]) for k, v in vision.items())  # stored, frozen
    # The projection trains, in a part of its own, as save_mmllama writes it.
    assert "vision_projection.weight" in read_safetensors(ckpt / parts["vision_projection"]["weights"])


def test_resume_through_the_loop_gives_the_same_losses(shapes, tmp_path):
    full = train(s := stage_for(shapes, tmp_path / "full", steps=6, checkpoint_every=2), s.config.train)
    # The process dies during step 5 (after the checkpoint of step 4).
    part = crash_after(stage_for(shapes, tmp_path / "part", steps=6, checkpoint_every=2), n_batches=4)
    with pytest.raises(Crash):
        train(part, part.config.train)
    resumed = train(s := stage_for(shapes, tmp_path / "part", steps=6, checkpoint_every=2), s.config.train,
                    resume=True)  # stage.load gives back every trainable tensor by name
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert abs(resumed.losses[step] - full.losses[step]) <= 1e-5, step


def test_command_line_synth_and_train(tmp_path):
    import os
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mm_llama.cli", *args], capture_output=True, text=True,
                              timeout=300, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})

    result = cli("data", "synth", "--kind", "image", "--out", str(tmp_path / "img"), "--n", "40", "--shard-size", "20")
    assert result.returncode == 0 and "wrote 2 shard(s)" in result.stdout, result.stderr
    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "image_adapter.yaml"
    result = cli("train", "image-adapter", "--config", str(config), "--trunk=null", "--trunk_preset=debug",
                 "--adapter.n_layers=2",  # the demo config's 3 blocks need the demo trunk's 6 layers; debug has 2
                 f"--data.shards={tmp_path / 'img'}", f"--data.tokenizer={tmp_path / 'img' / 'tokenizer.model'}",
                 "--data.num_workers=0", "--data.batch_size=4", f"--train.out_dir={tmp_path / 'run'}",
                 "--train.steps=2", "--train.device=cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "run") is not None
