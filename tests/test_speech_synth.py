"""Shapes-world speech (`mm-llama data synth --kind speech`): espeak-ng utterances of the world's sentences, in
training voices or the held-out one, byte-identical whatever the number of workers, readable by `speech-pretrain`."""

import io
import json
import shutil
import tarfile

import pytest
import soundfile

from mm_llama.data.speech import SpeechBatches, SpeechDataConfig
from mm_llama.data.world import split_of_sentence

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
    assert len(samples) == 36 and (tmp_path / "one" / "tokenizer.model").is_file()
    voices = set()
    for key in sorted({name.split(".")[0] for name in samples}):
        text = samples[f"{key}.txt"].decode()
        record = json.loads(samples[f"{key}.json"])
        wave, rate = soundfile.read(io.BytesIO(samples[f"{key}.flac"]))
        assert rate == 16_000 and wave.ndim == 1 and 0.7 < len(wave) / rate < 15, (text, len(wave))
        assert abs(wave).max() > 0.05  # speech, not silence
        assert (record["task"], record["language"]) == ("asr", "English") and record["kind"] in ("question", "caption")
        assert record["voice"]["name"] in TRAIN_VOICES and 130 <= record["voice"]["rate"] <= 210
        if record["kind"] == "question":  # a training question, never a held-out one
            assert split_of_sentence(text) == "train", text
        voices.add(record["voice"]["name"])
    assert len(voices) >= 6  # drawn from 42 settings
    held = members(synth_speech(tmp_path / "held", 4, seed=3, split="heldout")[0])
    for key in sorted({name.split(".")[0] for name in held}):
        record = json.loads(held[f"{key}.json"])
        assert record["voice"] == {"name": HELDOUT_VOICE.name, "rate": 165, "pitch": 45, "pitch_range": 55}
    accent, variant = HELDOUT_VOICE.name.split("+")
    assert all(not v.startswith(accent) and not v.endswith("+" + variant) for v in TRAIN_VOICES)


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
