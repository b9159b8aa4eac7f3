"""Stage `speech-pretrain` (BEST-RQ, paper §8.3.1) on the debug encoder and real speech from espeak-ng: the loss falls,
the frozen quantizer is bit-identical and saved, resume equals an uninterrupted run, bad audio is skipped."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import Crash, crash_after
from encoders.best_rq import RandomProjectionQuantizer
from mm_llama.checkpoints.ours import read_ours_parts
from mm_llama.config import load_config
from mm_llama.data.pack import pack
from mm_llama.data.speech import SpeechBatches, SpeechDataConfig
from mm_llama.errors import ConfigError
from mm_llama.train.loop import train
from mm_llama.train.speech_pretrain import SpeechPretrainStage, SpeechPretrainStageConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "speech_pretrain.yaml"
SENTENCES = ["The red circle moves to the left.", "Is there a green square at the top?", "A small blue star appears.",
             "How many shapes are there?", "The triangle turns yellow.", "What colour is the big circle?"]


@pytest.fixture(scope="module")
def speech_shards(tmp_path_factory) -> Path:
    """Six espeak-ng utterances (two voices, two rates) and one corrupt file, packed as speech shards."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; CI installs it)")
    folder = tmp_path_factory.mktemp("speech")
    lines = []
    for i, text in enumerate(SENTENCES):
        wav = folder / f"u{i}.wav"
        subprocess.run(["espeak-ng", "-v", ("en-us", "en")[i % 2], "-s", str(140 + 30 * (i % 2)), "-w", str(wav), text],
                       check=True, capture_output=True)
        lines.append({"audio": wav.name, "text": text})
    (folder / "bad.wav").write_bytes(b"RIFF not really a wave file")
    lines.insert(3, {"audio": "bad.wav", "text": "broken"})
    (folder / "list.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    pack("speech", folder / "list.jsonl", folder / "shards", shard_size=4)
    return folder / "shards"


def stage_config(shards: Path, run: Path, **train) -> SpeechPretrainStageConfig:
    overrides = [f"--data.shards={shards}", "--encoder.preset=debug", "--best_rq.codebook_size=64",
                 "--best_rq.n_codebooks=4", "--best_rq.mask_prob=0.05", "--best_rq.mask_span=8",
                 "--data.batch_size=4", "--data.num_workers=0", "--data.shuffle_buffer=4",
                 "--data.max_skip_fraction=0.5", f"--train.out_dir={run}", "--train.lr=3e-3", "--train.warmup_steps=2",
                 "--train.grad_accum=1", "--train.activation_checkpointing=false", "--train.log_every=1",
                 "--train.weight_decay=0.0", *(f"--train.{k}={v}" for k, v in train.items())]
    return load_config(SpeechPretrainStageConfig, CONFIG, overrides)


def test_the_data_are_normalised_log_mels_and_bad_audio_is_skipped(speech_shards):
    batch = next(SpeechBatches(SpeechDataConfig(shards=str(speech_shards), batch_size=6, shuffle_buffer=0,
                                                resampled=False, max_skip_fraction=0.5)).batches())
    assert batch["samples"] == 6 and batch["skipped"] == 1 and batch["mel"].shape[-1] == 80
    for mel, n in zip(batch["mel"], batch["lengths"].tolist(), strict=True):
        assert 100 < n < 400 and bool((mel[n:] == 0).all())  # 1-4 s of speech, padding zero
        assert mel[:n].mean(0).abs().max() < 1e-4 and (mel[:n].std(0) - 1).abs().max() < 0.01  # normalised


def test_loss_falls_the_quantizer_stays_and_resume_equals_uninterrupted(speech_shards, tmp_path):
    config = stage_config(speech_shards, tmp_path / "run", steps=30, checkpoint_every=15)
    stage = SpeechPretrainStage(config)
    result = train(stage, config.train)
    losses = [result.losses[k] for k in sorted(result.losses)]
    assert losses[0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.25)  # about uniform at first
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    parts = read_ours_parts(result.last_checkpoint)
    assert set(parts) == {"speech_encoder", "best_rq"}
    fresh = RandomProjectionQuantizer(config.best_rq)  # seeded: the run's targets, known again after a load
    stored = parts["best_rq"][1]
    assert torch.equal(stored["best_rq.quantizer.projection"], fresh.projection)
    assert torch.equal(stored["best_rq.quantizer.codebooks"], fresh.codebooks)
    assert torch.equal(result.model.quantizer.projection, fresh.projection)  # no step moved it
    assert torch.equal(result.model.quantizer.codebooks, fresh.codebooks)
    # A run that dies after step 17 resumes from its step-15 checkpoint and gives the uninterrupted run's losses.
    crashed = crash_after(SpeechPretrainStage(stage_config(speech_shards, tmp_path / "part", steps=30,
                                                           checkpoint_every=15)), n_batches=17)
    with pytest.raises(Crash):
        train(crashed, crashed.config.train)
    again = stage_config(speech_shards, tmp_path / "part", steps=30, checkpoint_every=15)
    resumed = train(SpeechPretrainStage(again), again.train, resume=True)
    assert sorted(resumed.losses) == list(range(16, 31))
    for step in range(16, 31):
        assert abs(resumed.losses[step] - result.losses[step]) <= 1e-5, step


def test_config_mismatch_is_refused(speech_shards, tmp_path):
    with pytest.raises(ConfigError, match="best_rq stacks 2 frames of 80 mels, the encoder 4"):
        load_config(SpeechPretrainStageConfig, CONFIG, [f"--data.shards={speech_shards}", "--best_rq.stack=2"])


def test_only_masked_frames_are_scored(speech_shards, tmp_path):
    """The loss's gradient reaches the heads' output at the target frames (all 4 mel frames masked) and nowhere else."""
    config = stage_config(speech_shards, tmp_path / "run", steps=1)
    stage = SpeechPretrainStage(config)
    runtime = type("Runtime", (), {"device": torch.device("cpu"), "rank": 0, "world_size": 1})()
    model = stage.build(runtime)
    batch = next(stage.batches(runtime, 0))
    outputs = []
    model.heads.register_forward_hook(lambda module, args, out: outputs.append(out) or out.retain_grad())
    stage.loss(model, batch).backward()
    grad = outputs[0].grad.abs().sum(-1)  # (B, S): one value per encoder frame
    targets = batch["targets"]
    assert 0 < int(targets.sum()) < targets.numel() and stage.n_targets(batch) == int(targets.sum()) * 4
    assert bool((grad[~targets] == 0).all()) and bool((grad[targets] > 0).all())


def test_an_utterance_over_a_minute_is_cropped_to_6000_frames_the_same_way_every_pass(tmp_path):
    import numpy as np
    import soundfile

    rate = 22_050
    wave = np.sin(np.arange(75 * rate) * 2 * np.pi * np.linspace(100, 2000, 75 * rate) / rate).astype(np.float32)
    soundfile.write(tmp_path / "long.flac", 0.3 * wave, rate)
    (tmp_path / "list.jsonl").write_text(json.dumps({"audio": "long.flac", "text": "a rising tone"}) + "\n")
    pack("speech", tmp_path / "list.jsonl", tmp_path / "shards")
    config = SpeechDataConfig(shards=str(tmp_path / "shards"), batch_size=1, shuffle_buffer=0, resampled=False)
    first, again = (next(SpeechBatches(config).batches()) for _ in range(2))
    assert first["lengths"].tolist() == [6000] and first["mel"].shape == (1, 6000, 80)  # §8.3.1: 60 s, 6,000 frames
    assert torch.equal(first["mel"], again["mel"])
    # The offset comes from (seed, sample key): another seed crops another minute of the rising tone.
    other = SpeechDataConfig(shards=str(tmp_path / "shards"), batch_size=1, shuffle_buffer=0, resampled=False, seed=1)
    assert not torch.equal(first["mel"], next(SpeechBatches(other).batches())["mel"])
