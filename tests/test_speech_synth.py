"""Shapes-world speech (`mm-llama data synth --kind speech`): espeak-ng utterances of the world's sentences, in
training voices or the held-out one, byte-identical whatever the number of workers, readable by `speech-pretrain`."""

import io
import json
import random
import shutil
import tarfile

import pytest
import soundfile
import torch
from PIL import Image

from mm_llama.data.speech import SpeechBatches, SpeechDataConfig
from mm_llama.data.world import split_of_sentence
from mm_llama.data.world_draw import DEFAULT_SIZE
from mm_llama.data.world_language import QUESTION_TYPES
from mm_llama.errors import InputError

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (CI installs it)")


def members(shard):
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_utterances_are_the_world_spoken_and_the_same_whatever_the_workers(tmp_path):
    from mm_llama.data.synth_speech import HELDOUT_VOICE, TRAIN_VOICES, synth_speech

    one = synth_speech(tmp_path / "one", 12, seed=3, workers=1)
    two = synth_speech(tmp_path / "two", 12, seed=3, workers=2)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]
    samples = members(one[0])
    keys = sorted({name.split(".")[0] for name in samples})
    assert len(keys) == 12 and (tmp_path / "one" / "tokenizer.model").is_file()
    voices, tasks = set(), set()
    for key in keys:
        text = samples[f"{key}.txt"].decode()
        record = json.loads(samples[f"{key}.json"])
        wave, rate = soundfile.read(io.BytesIO(samples[f"{key}.flac"]))
        assert rate == 16_000 and wave.ndim == 1 and 0.7 < len(wave) / rate < 15, (text, len(wave))
        assert abs(wave).max() > 0.05  # speech, not silence
        assert record["task"] in ("asr", "dialogue") and record["language"] == "English"
        assert record["kind"] in ("question", "caption") and (f"{key}.png" in samples) == (record["task"] == "dialogue")
        assert record["voice"]["name"] in TRAIN_VOICES and 130 <= record["voice"]["rate"] <= 210
        if record["kind"] == "question":  # a training question, never a held-out one
            assert split_of_sentence(text) == "train", text
        voices.add(record["voice"]["name"])
        tasks.add(record["task"])
    assert tasks == {"asr", "dialogue"}
    assert len(voices) >= 6  # drawn from 168 settings
    held = members(synth_speech(tmp_path / "held", 4, seed=3, split="heldout")[0])
    for key in sorted({name.split(".")[0] for name in held}):
        record = json.loads(held[f"{key}.json"])
        assert record["voice"] == {"name": HELDOUT_VOICE.name, "rate": 165, "pitch": 45, "pitch_range": 55}
    accent, variant = HELDOUT_VOICE.name.split("+")
    assert all(not v.startswith(accent) and not v.endswith("+" + variant) for v in TRAIN_VOICES)


def test_half_the_samples_are_spoken_questions_about_a_picture():
    from mm_llama.data.synth_speech import SPOKEN_QA_SHARE, speech_sample

    rng = random.Random(5)
    samples = [speech_sample(rng) for _ in range(40)]
    dialogue = [s for s in samples if json.loads(s["json"])["task"] == "dialogue"]
    assert SPOKEN_QA_SHARE == 0.5 and 10 <= len(dialogue) <= 30  # Binomial(40, 0.5): 20 +- 3.2
    for sample in samples:
        record = json.loads(sample["json"])
        if record["task"] == "asr":
            assert set(sample) == {"flac", "txt", "json"} and record["kind"] in ("question", "caption")
            continue
        assert set(sample) == {"flac", "png", "txt", "json"} and record["kind"] == "question"
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.size == (DEFAULT_SIZE, DEFAULT_SIZE) and image.mode == "RGB"
        wave, rate = soundfile.read(io.BytesIO(sample["flac"]))
        assert rate == 16_000 and wave.ndim == 1 and abs(wave).max() > 0.05
        assert sample["txt"].decode() == record["question"] and split_of_sentence(record["question"]) == "train"
        assert isinstance(record["answer"], str) and len(record["answer"]) > 1 and record["answer"].endswith(".")
        assert record["type"] in QUESTION_TYPES and set(record["voice"]) == {"name", "rate", "pitch", "pitch_range"}


def test_spoken_question_heldout():
    from mm_llama.data.synth_speech import HELDOUT_VOICE, spoken_question

    one, two = spoken_question(random.Random(0), "heldout"), spoken_question(random.Random(0), "heldout")
    assert one.voice == HELDOUT_VOICE and one.qtype in QUESTION_TYPES and one.answer.endswith(".")
    assert one.wave.dtype == torch.float32 and one.wave.ndim == 1 and 0.7 < len(one.wave) / 16_000 < 15
    assert torch.equal(one.wave, two.wave) and (one.question, one.answer) == (two.question, two.answer)
    assert one.image.size == (DEFAULT_SIZE, DEFAULT_SIZE) and one.image.tobytes() == two.image.tobytes()
    assert split_of_sentence(one.question) == "heldout"
    assert spoken_question(random.Random(0), "heldout", "relative position").qtype == "relative position"
    with pytest.raises(InputError, match="no relative position question"):  # one shape: the caller draws again
        spoken_question(random.Random(2), "heldout", "relative position")


def test_speech_pretrain_reads_them(tmp_path):
    from mm_llama.data.synth_speech import synth_speech

    synth_speech(tmp_path, 5, seed=0, workers=1)
    batch = next(SpeechBatches(SpeechDataConfig(shards=str(tmp_path), batch_size=5, shuffle_buffer=0,
                                                resampled=False)).batches())
    assert batch["samples"] == 5 and batch["skipped"] == 0 and batch["mel"].shape[-1] == 80
    assert 70 < int(batch["lengths"].min()) <= int(batch["lengths"].max()) < 1500  # 0.7-15 s of 10 ms frames


def test_command_line(tmp_path):
    from test_cli import mm_llama

    result = mm_llama("data", "synth", "--kind", "speech", "--out", str(tmp_path / "s"), "--n", "3")
    assert result.returncode == 0 and "wrote 1 shard(s)" in result.stdout, result.stderr
    result = mm_llama("data", "synth", "--kind", "speech", "--out", str(tmp_path / "t"), "--n", "3", "--size", "84")
    assert result.returncode == 2 and "--size 84 applies to --kind image or video" in result.stderr
