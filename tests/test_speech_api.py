"""Speech into the composed model end to end: the saved speech parts, span lengths, the splice, `Assistant.ask(audio=)`,
`ask_batch(audios=)`, `transcribe` (long audio in chunks cut at pauses, an hour in bounded memory), bad audio and the
`mm-llama transcribe` / `ask --audio` commands — on a small random speech model saved in mm-llama's format and speech
from espeak-ng."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from adapters.speech import SpeechAdapterConfig, speech_positions
from conftest import espeak_wave, make_speech_model, make_video_model, run_mm_llama
from encoders.audio import HOP, SAMPLE_RATE, load_audio
from encoders.utterances import Utterances, audio_chunks, chunk_bounds, quiet_cut
from mm_llama.api import Assistant
from mm_llama.checkpoints import save_mmllama
from mm_llama.errors import InputError
from mm_llama.media import Media
from mm_llama.model import MMLlama

SENTENCES = ["What colour is the circle?", "Where is the red square?", "How many stars are there?",
             "Is the blue triangle above the square?", "The green circle moves to the left.",
             "Two yellow stars and one red square.", "Which shape is the largest?"]
MAX_SECONDS = 4  # make_speech_model's longest span


def trimmed(text: str) -> tuple[np.ndarray, int]:
    """espeak-ng's `text` without its leading and trailing silence."""
    wave, rate = espeak_wave(text)
    voiced = np.nonzero(np.abs(wave) > 1e-4)[0]
    return wave[voiced[0]:voiced[-1] + 1], rate


def joined(texts: list[str], gap: float) -> tuple[np.ndarray, int]:
    """The sentences spoken one after another, `gap` seconds of digital silence between them."""
    waves = [trimmed(t) for t in texts]
    rate = waves[0][1]
    silence = np.zeros(round(gap * rate), np.float32)
    parts = [p for w, _ in waves for p in (w, silence)][:-1]
    return np.concatenate(parts), rate


@pytest.fixture(scope="module")
def speech_model(tmp_path_factory) -> Path:
    return make_speech_model(tmp_path_factory.mktemp("speech") / "model")


@pytest.fixture(scope="module")
def assistant(speech_model) -> Assistant:
    return Assistant.from_pretrained(speech_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def long_speech() -> tuple[np.ndarray, int]:
    """About 15 s of speech at 22050 Hz: several 4 s chunks."""
    wave, rate = joined(SENTENCES * 2, gap=0.3)
    assert 14 < len(wave) / rate < 30
    return wave, rate


def spoken_prompt(assistant: Assistant, waves: list, text: str = "Answer.") -> tuple[torch.Tensor, Media, list[int]]:
    """(tokens (1, T), media, each span's first position) of a user turn holding each waveform as a span, then
    `text`."""
    utterances = Utterances.from_waves([load_audio(w) for w in waves])
    positions = assistant.model.speech_positions(utterances.host_lengths)
    parts = [{"type": "speech", "positions": p} for p in positions] + [{"type": "text", "text": text}]
    ids = assistant.tokenizer.encode_dialog([{"role": "user", "content": parts}])
    starts = [t + 1 for t, i in enumerate(ids) if i == assistant.tokenizer.speech_start_id]
    return torch.tensor([ids]), Media(speech=utterances), starts


def test_a_saved_speech_model_loads_with_its_speech_parts_and_the_same_logits(speech_model, assistant, tmp_path):
    model = MMLlama.from_pretrained(speech_model, dtype=torch.float32)
    assert model.speech_encoder is not None and model.speech_adapter is not None
    assert model.config.speech_adapter.max_seconds == MAX_SECONDS and model.config.speech_encoder.stack == 4
    assert {"speech_encoder", "speech_adapter", "media"} <= set(model.parts())
    n_speech = sum(p.numel() for name in ("speech_encoder", "speech_adapter") for p in model.parts()[name].parameters())
    assert n_speech > 100_000
    tokens, media, _ = spoken_prompt(assistant, [trimmed(SENTENCES[0])])
    save_mmllama(model, tmp_path / "again")
    again = MMLlama.from_pretrained(tmp_path / "again", dtype=torch.float32)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        first, second = model(tokens, media), again(tokens, media)
    assert first.shape == (1, tokens.shape[1], model.config.trunk.vocab_size)
    assert (first - second).abs().max() <= 1e-6


def test_speech_positions_follow_the_papers_frame_rates(assistant):
    mel = torch.arange(1, 2001)
    expected = [math.ceil(math.ceil(t / 4) / 2) for t in range(1, 2001)]
    assert speech_positions(mel, 4, SpeechAdapterConfig()).tolist() == expected
    assert speech_positions(torch.tensor([6000]), 4, SpeechAdapterConfig()).tolist() == [750]  # 60 s
    model = assistant.model
    assert model.speech_positions(mel) == expected  # the debug adapter has the paper's kernel and stride
    # The modules themselves give that many embeddings per utterance, in one padded batch.
    lengths = [1, 3, 4, 5, 8, 9, 401]
    mel_batch = torch.randn(len(lengths), max(lengths), 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames, frame_lengths = model.speech_encoder(mel_batch, torch.tensor(lengths))
        embeddings, positions = model.speech_adapter(frames, frame_lengths)
    assert positions.tolist() == model.speech_positions(lengths) == [1, 1, 1, 1, 1, 2, 51]
    assert embeddings.shape == (len(lengths), 51, model.config.trunk.dim)


def test_the_spliced_speech_is_what_the_model_reads(assistant):
    model, tok = assistant.model, assistant.tokenizer
    wave, rate = trimmed(SENTENCES[0])
    other = wave + 0.05 * np.random.default_rng(0).standard_normal(len(wave)).astype(np.float32)
    tokens, media, (start,) = spoken_prompt(assistant, [(wave, rate)])
    tokens_other, media_other, _ = spoken_prompt(assistant, [(other, rate)])
    assert torch.equal(tokens, tokens_other)  # same length, same span
    n = model.speech_positions(media.speech.host_lengths)[0]
    assert n > 10 and tokens[0, start:start + n].eq(tok.speech_id).all() and tokens[0, start + n] == tok.speech_end_id
    with torch.no_grad():
        logits, logits_other = model(tokens, media), model(tokens, media_other)
    # Before the span nothing changes (causal); from its first position on, the audio decides.
    assert torch.equal(logits[0, :start], logits_other[0, :start])
    assert (logits[0, start:] - logits_other[0, start:]).abs().amax(dim=-1).min() > 1e-3
    # The <|speech|> row itself is never read (the splice replaces it), unlike the <|speech_start|> row.
    changed = copy.deepcopy(model)
    rows = changed.media.learnable_embedding.weight
    with torch.no_grad():
        rows[tok.speech_id - model.config.trunk.vocab_size] += 1.0
        assert torch.equal(changed(tokens, media), logits)
        rows[tok.speech_start_id - model.config.trunk.vocab_size] += 1.0
        assert (changed(tokens, media) - logits)[0, start - 1:].abs().amax(dim=-1).min() > 1e-3
    # Text alone: no media, the trunk's logits exactly.
    text = torch.tensor([tok.encode_dialog([{"role": "user", "content": "What colour is the circle?"}])])
    with torch.no_grad():
        assert torch.equal(model(text), model.trunk(text))


def test_a_batch_of_spoken_questions_answers_as_one_by_one(assistant, speech_model):
    audios = [espeak_wave(t) for t in SENTENCES[:4]]
    assert len({len(w) for w, _ in audios}) == 4  # different lengths: the batch is left-padded
    batched = assistant.ask_batch([None] * 4, audios=audios, max_new_tokens=6)
    alone = [assistant.ask(audio=a, max_new_tokens=6) for a in audios]
    assert batched == alone and all(isinstance(a, str) and a for a in alone)
    assert len(set(alone)) > 1  # the answers depend on the audio
    # A typed question with the audio, and the MMLlama conveniences (the checkpoint's tokenizer).
    mixed = assistant.ask_batch(["Answer.", None], audios=[audios[0], audios[1]], max_new_tokens=6)
    assert mixed == [assistant.ask("Answer.", audio=audios[0], max_new_tokens=6), alone[1]]
    model = MMLlama.from_pretrained(speech_model, dtype=torch.float32)
    assert model.ask(audio=audios[2], max_new_tokens=6) == alone[2]
    assert model.transcribe(audios[3], max_new_tokens=6) == assistant.transcribe(audios[3], max_new_tokens=6)


def test_long_audio_is_transcribed_chunk_by_chunk_whatever_the_batch(assistant, long_speech):
    chunks = list(audio_chunks(long_speech, MAX_SECONDS))
    assert 4 <= len(chunks) <= 8
    one = assistant.transcribe(long_speech, max_new_tokens=6, batch_size=1)
    assert one == assistant.transcribe(long_speech, max_new_tokens=6, batch_size=4)
    # The transcript is each chunk's, in order, joined by spaces.
    each = [assistant.transcribe((c, SAMPLE_RATE), max_new_tokens=6) for c in chunks]
    assert one == " ".join(t for t in each if t) and len(one) > 10
    # ask: every chunk is its own span, all in one prompt.
    prompt, _, _, spoken = assistant._prompt("Answer.", None, None, None, None, long_speech)
    assert len(spoken) == len(chunks) and prompt.count(assistant.tokenizer.speech_start_id) == len(chunks)
    assert prompt.count(assistant.tokenizer.speech_id) == sum(assistant.model.speech_positions(
        [len(c) // HOP for c in chunks]))


def test_mismatched_spans_and_requests_are_input_errors(assistant, tmp_path):
    model, tok = assistant.model, assistant.tokenizer
    a, b = trimmed(SENTENCES[0]), trimmed(SENTENCES[1])
    tokens, media_one, (start,) = spoken_prompt(assistant, [a])
    _, media_two, _ = spoken_prompt(assistant, [a, b])
    with torch.no_grad(), pytest.raises(InputError, match=r"2 utterance\(s\) but 1 <\|speech_start\|> span\(s\)"):
        model(tokens, media_two)
    tokens_two, _, _ = spoken_prompt(assistant, [a, b])
    with pytest.raises(InputError, match=r"more <\|speech_start\|> spans than the 1 utterance\(s\)"):
        model.prepare(tokens_two, media_one)
    n = model.speech_positions(media_one.speech.host_lengths)[0]
    ids = tokens[0].tolist()
    short = ids[:start] + [tok.speech_id] * (n - 1) + ids[start + n:]
    with pytest.raises(InputError, match=rf"speech span 0 \(row 0\) holds {n - 1} <\|speech\|> positions then "
                                         rf"<\|speech_end\|>; its utterance needs {n} then <\|speech_end\|>"):
        model.prepare([short], media_one)
    unclosed = ids[:start + n] + [tok.speech_id] + ids[start + n + 1:]  # <|speech_end|> overwritten
    with pytest.raises(InputError, match=rf"holds {n + 1} <\|speech\|> positions then token \d+; its utterance "
                                         rf"needs {n}"):
        model.prepare([unclosed], media_one)
    # The request itself.
    with pytest.raises(InputError, match="give a question, audio with a spoken question"):
        assistant.ask()
    with pytest.raises(InputError, match="language must be a non-empty str such as 'English', got ''"):
        assistant.transcribe(a, language="")
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 0"):
        assistant.transcribe(a, batch_size=0)
    with pytest.raises(InputError, match="audios must be a list with one entry .* per question: 2 question"):
        assistant.ask_batch([None, "Answer."], audios=[a])
    with pytest.raises(InputError, match=r"^question 1: audio \(waveform, sample_rate\) tuple is silent"):
        assistant.ask_batch([None, None], audios=[a, (np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)])
    with pytest.raises(InputError, match="max_seconds must be a number >= 1, got 0"):
        next(audio_chunks(a, 0))  # not an endless run of empty chunks
    # A model without speech says so, whichever way the audio comes.
    image_assistant = Assistant.from_pretrained(make_video_model(tmp_path / "image-model", video=False),
                                                dtype=torch.float32)
    with pytest.raises(InputError, match="no speech encoder: it does not take audio"):
        image_assistant.ask("What is it?", audio=a)
    with pytest.raises(InputError, match="no speech encoder: it cannot transcribe audio"):
        image_assistant.transcribe(a)
    with torch.no_grad(), pytest.raises(InputError, match="this model has no speech encoder: it does not take audio"):
        image_assistant.model(tokens, media_one)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    """The same sentence at several sample rates and in stereo, and broken audio files."""
    folder = tmp_path_factory.mktemp("audio")
    wave, rate = espeak_wave(SENTENCES[1])
    files = {}
    for new_rate in (8000, 16000, 44100, 48000):
        files[f"{new_rate} Hz"] = folder / f"speech{new_rate}.wav"
        soundfile.write(files[f"{new_rate} Hz"], torchaudio.functional.resample(torch.from_numpy(wave), rate,
                                                                                new_rate).numpy(), new_rate)
    files["stereo"] = folder / "stereo.wav"
    soundfile.write(files["stereo"], np.stack([wave, 0.5 * wave], axis=1), rate)
    files["empty"] = folder / "empty.wav"
    files["empty"].write_bytes(b"")
    files["no samples"] = folder / "none.wav"
    soundfile.write(files["no samples"], np.zeros(0, np.float32), SAMPLE_RATE)
    noise = 0.1 * np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32)
    files["10 ms"], files["5 ms"] = folder / "ten.wav", folder / "five.wav"
    soundfile.write(files["10 ms"], noise[:160], SAMPLE_RATE)
    soundfile.write(files["5 ms"], noise[:80], SAMPLE_RATE)
    files["silence"] = folder / "silence.wav"
    soundfile.write(files["silence"], np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    files["text"] = folder / "notes.wav"
    files["text"].write_text("not audio, only a name that says so\n")
    return files


def both(assistant: Assistant, audio) -> list[str]:
    """What `transcribe` and `ask` make of `audio`."""
    return [assistant.transcribe(audio, max_new_tokens=4), assistant.ask(audio=audio, max_new_tokens=4)]


def test_bad_audio_is_a_clear_input_error_naming_it(assistant, audio_files):
    wave, rate = espeak_wave(SENTENCES[1])
    with_nan = wave.copy()
    with_nan[[100, 2000]] = np.nan
    cases = [(audio_files["empty"], "is empty \\(0 bytes\\); expected an audio file: WAV, FLAC"),
             (b"", "audio bytes are empty \\(0 bytes\\)"),
             (audio_files["no samples"], "has no samples \\(0 s of audio\\)"),
             (audio_files["5 ms"], "has 80 samples at 16 kHz \\(5 ms\\), shorter than 10 ms"),
             ((wave[:100], rate), "tuple has 73 samples at 16 kHz \\(4.5625 ms\\), shorter than 10 ms"),
             (audio_files["text"], "cannot be read as audio \\(.*Format not recognised.*\\); expected an audio file"),
             (audio_files["text"].read_bytes(), "audio bytes cannot be read as audio"),
             (audio_files["text"].with_name("missing.wav"), "does not exist or is not a file"),
             ((with_nan, rate), f"has 2 non-finite samples of {len(wave)} \\(2 NaN, 0 infinite\\)")]
    for audio, message in cases:
        for call in (lambda a: assistant.transcribe(a, max_new_tokens=4),
                     lambda a: assistant.ask(audio=a, max_new_tokens=4)):
            with pytest.raises(InputError, match=message) as error:
                call(audio)
            if isinstance(audio, Path):
                assert str(audio) in str(error.value)


def test_odd_but_valid_audio_gets_an_answer(assistant, audio_files):
    assert all(isinstance(a, str) for a in both(assistant, audio_files["10 ms"]))
    # A file's bytes are the file.
    path = audio_files["16000 Hz"]
    assert both(assistant, path.read_bytes()) == both(assistant, path) == both(assistant, str(path))
    # The same sentence at other rates and in stereo: an answer each, the same length at 16 kHz within 1 %.
    wave, rate = espeak_wave(SENTENCES[1])
    n = len(load_audio((wave, rate)))
    for name in ("8000 Hz", "44100 Hz", "48000 Hz", "stereo"):
        assert all(isinstance(a, str) for a in both(assistant, audio_files[name])), name
        chunks = list(audio_chunks(audio_files[name], MAX_SECONDS))
        assert len(chunks) == 1 and abs(len(chunks[0]) - n) <= 0.01 * n, (name, len(chunks[0]), n)


def test_silence_is_heard_as_nothing_and_quiet_speech_as_speech(assistant, audio_files):
    # Digital silence and 16-bit dither (+-2 LSB, -84 dBFS) hold nothing to hear: `transcribe` writes nothing rather
    # than what the model makes up for them, and `ask` says so, naming the input.
    dither = (np.random.default_rng(1).integers(-2, 3, 2 * SAMPLE_RATE) / 32768).astype(np.float32)
    silence = audio_files["silence"]
    for audio in (silence, silence.read_bytes(), (dither, SAMPLE_RATE), (np.zeros((SAMPLE_RATE, 2)), 44_100)):
        assert assistant.transcribe(audio, max_new_tokens=4) == ""
        with pytest.raises(InputError, match=r"is silent \(no sample reaches -70 dBFS\): nothing is said in it; "
                                             r"expected speech") as error:
            assistant.ask("What do you hear?", audio=audio, max_new_tokens=4)
        assert isinstance(audio, tuple) or str(error.value).startswith(("audio file " + str(silence), "audio bytes"))
    # A sentence at -60 dBFS (a whisper at low gain) is speech: features are normalised per utterance, so the model
    # hears it as it hears the sentence at full scale.
    wave, rate = espeak_wave(SENTENCES[1])
    quiet = (wave / np.abs(wave).max() * 10 ** (-60 / 20)).astype(np.float32)
    assert both(assistant, (quiet, rate)) == both(assistant, (wave, rate))


def test_chunks_of_a_file_and_of_its_waveform_agree(long_speech, tmp_path):
    wave, rate = long_speech
    soundfile.write(tmp_path / "long.flac", wave, rate)
    total = len(load_audio(long_speech))
    at_16k = load_audio(long_speech).numpy()
    counts = {}
    for name, source in (("waveform", long_speech), ("flac", tmp_path / "long.flac"),
                         ("16 kHz", (at_16k, SAMPLE_RATE))):
        chunks = list(audio_chunks(source, MAX_SECONDS))
        counts[name] = len(chunks)
        assert all(len(c) <= MAX_SECONDS * SAMPLE_RATE for c in chunks), name
        assert all(len(c) >= 0.75 * MAX_SECONDS * SAMPLE_RATE for c in chunks[:-1]), name  # cuts in the last quarter
        assert abs(sum(len(c) for c in chunks) - total) <= 0.01 * total, name
    assert counts["waveform"] == counts["flac"] == counts["16 kHz"] >= 4
    # Without resampling the chunks are the audio itself, cut into pieces.
    assert torch.equal(torch.cat(list(audio_chunks((at_16k, SAMPLE_RATE), MAX_SECONDS))), torch.from_numpy(at_16k))


def test_a_cut_lands_in_the_pause_between_two_sentences():
    first, rate = trimmed(SENTENCES[3])
    second, _ = trimmed(SENTENCES[1])
    gap = round(0.3 * rate)
    wave = np.concatenate([first, np.zeros(gap, np.float32), second])
    window = len(first) + gap + round(0.15 * rate)  # ends 0.15 s into the second sentence
    assert len(first) > 0.75 * window  # the pause is inside the searched last quarter
    cut = quiet_cut(wave[:window], rate)
    assert len(first) < cut < len(first) + gap
    assert chunk_bounds(wave, rate, window / rate) == cut and chunk_bounds(wave, rate, len(wave) / rate) == len(wave)
    # audio_chunks cuts there too (at 16 kHz, within a 20 ms frame): the first chunk is the first sentence.
    chunks = list(audio_chunks((wave, rate), window / rate))
    end_of_first, start_of_second = len(first) * SAMPLE_RATE / rate, (len(first) + gap) * SAMPLE_RATE / rate
    assert len(chunks) == 2 and end_of_first < len(chunks[0]) < start_of_second
    assert chunks[0][-80:].abs().max() < 1e-3  # it ends in silence


HOUR_CHUNKS = """
import json, resource, sys
from encoders.utterances import audio_chunks

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux reports KiB)

base, lengths, tails = peak(), [], []
for chunk in audio_chunks(sys.argv[1], 60):
    lengths.append(len(chunk))
    tails.append(float(chunk[-80:].abs().max()))
    if len(lengths) == 6:
        early = peak()
print(json.dumps({"lengths": lengths, "tails": tails, "base": base, "early": early, "peak": peak()}))
"""

HOUR_TRANSCRIPT = """
import json, resource, sys
import torch
from mm_llama.api import Assistant

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB

assistant = Assistant.from_pretrained(sys.argv[1], dtype=torch.float32)
base, peaks, generate = peak(), [], assistant._generate

def measured(*args, **kwargs):  # the peak after each batch of chunks
    answers = generate(*args, **kwargs)
    peaks.append(peak())
    return answers

assistant._generate = measured
text = assistant.transcribe(sys.argv[2], max_new_tokens=1)
print(json.dumps({"text": text, "base": base, "peaks": peaks}))
"""


def run_python(code: str, *args) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_an_hour_of_audio_is_read_and_transcribed_in_bounded_memory(tmp_path):
    # An hour at 48 kHz, stereo, written as FLAC a minute at a time: a sentence, then 1 s of silence, over and over.
    # Held whole as float32 it would take 3600 * 48000 * 2 * 4 bytes = 1.38 GB.
    rate, sentence = 48_000, espeak_wave(SENTENCES[0])
    spoken = torchaudio.functional.resample(torch.from_numpy(sentence[0]), sentence[1], rate).numpy()
    period = np.concatenate([spoken, np.zeros(rate, np.float32)])
    minute = np.tile(period, math.ceil(60 * rate / len(period)) + 1)
    hour = tmp_path / "hour.flac"
    with soundfile.SoundFile(hour, "w", rate, 2, format="FLAC", compression_level=0) as out:
        written = 0
        while written < 3600 * rate:
            offset = written % len(period)  # continue the pattern where the last block left it
            block = minute[offset:offset + min(60 * rate, 3600 * rate - written)]
            out.write(np.stack([block, 0.5 * block], axis=1))
            written += len(block)
    assert soundfile.info(hour).frames == 3600 * rate and soundfile.info(hour).channels == 2

    read = run_python(HOUR_CHUNKS, hour)
    lengths = read["lengths"]
    # A chunk ends at the quietest 20 ms of its window's last 5 s: 55 to 60 s each, the rest last.
    assert all(55 * SAMPLE_RATE < n <= 60 * SAMPLE_RATE for n in lengths[:-1]) and 60 <= len(lengths) <= 66
    assert abs(sum(lengths) - 3600 * SAMPLE_RATE) <= 0.001 * 3600 * SAMPLE_RATE
    assert max(read["tails"][:-1]) < 1e-3  # every cut falls in a pause
    # Measured on 2 (busy) CPU cores: 66 chunks of 55 s when a cut took the first of equally quiet frames, 61 since
    # it takes the last; 491-501 MB after the imports (torch, torchaudio), 713-716 MB at the peak (one 60 s window read,
    # mixed down and resampled: +225 MB), 691-696 MB of it within the first 6 chunks.
    assert read["peak"] - read["base"] < 400, read
    assert read["peak"] - read["early"] < 64, read  # no growth with the length

    model = make_speech_model(tmp_path / "model", vision=False, max_seconds=60)
    heard = run_python(HOUR_TRANSCRIPT, model, hour)
    assert isinstance(heard["text"], str)
    assert len(heard["text"].split(" ")) == len(lengths)  # one token per chunk, every chunk
    # Measured: 620-631 MB with the model loaded, 1,112-1,125 MB at the peak (+490 MB: a batch of 8 chunks of 55-60 s,
    # the conformer's attention over 1,379 frames each), all but 15 MB of it by the third of 9 batches.
    peaks = heard["peaks"]
    assert len(peaks) == math.ceil(len(lengths) / 8)
    assert peaks[-1] - heard["base"] < 700, heard
    assert peaks[-1] - peaks[2] < 64, heard  # no growth with the length
    hour.unlink()  # 110 MB that pytest's kept temporary folders need not hold


def test_cli_transcribe_and_ask_with_audio(speech_model, assistant, audio_files):
    speech = audio_files["16000 Hz"]
    result = run_mm_llama("transcribe", "--checkpoint", speech_model, "--max-new-tokens", 6, speech)
    assert result.returncode == 0, result.stderr
    assert result.stdout == assistant.transcribe(speech, max_new_tokens=6) + "\n" and result.stdout.strip()
    result = run_mm_llama("ask", "--checkpoint", speech_model, "--audio", speech, "--max-new-tokens", 6)
    assert result.returncode == 0, result.stderr
    assert result.stdout == assistant.ask(audio=speech, max_new_tokens=6) + "\n" and result.stdout.strip()
    readme = Path(__file__).resolve().parents[1] / "README.md"
    result = run_mm_llama("transcribe", "--checkpoint", speech_model, readme)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and f"audio file {readme} cannot be read as audio" in result.stderr
    result = run_mm_llama("transcribe", "--checkpoint", speech_model, audio_files["silence"])
    assert result.returncode == 0 and result.stdout == "\n", result.stderr
    assert result.stderr == f"mm-llama: no speech heard in {audio_files['silence']}: the transcript is empty\n"
    result = run_mm_llama("ask", "--checkpoint", speech_model)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == "mm-llama: error: give a question, --audio FILE with a spoken question, or both\n"


def test_a_span_of_the_longest_utterance_must_fit_the_context():
    from adapters.speech import SpeechAdapterConfig
    from encoders.speech import SpeechEncoderConfig
    from mm_llama.errors import ConfigError
    from mm_llama.llama import LlamaConfig
    from mm_llama.model import MMConfig

    def config(context: int, seconds: float) -> MMConfig:
        return MMConfig(trunk=LlamaConfig.preset("debug", max_seq_len=context),
                        speech_encoder=SpeechEncoderConfig.preset("debug"),
                        speech_adapter=SpeechAdapterConfig(in_dim=64, dim=64, n_heads=4, max_seconds=seconds))

    assert config(816, 60).speech_adapter.max_seconds == 60  # 752 positions (750 + the markers) + 64 for the prompt
    with pytest.raises(ConfigError, match=r"60 s\) takes 752 positions, leaving under 64 of the trunk's context "
                                          r"\(815\)"):
        config(815, 60)
    assert config(256, 15).speech_adapter.max_seconds == 15  # 190 positions
