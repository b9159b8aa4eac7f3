"""The embedded demo model (`mm_llama/demo_model`, trained by `mm-llama recipe demo`): within its size budget, loaded
by name, and answering held-out shapes-world questions well above chance — about pictures, text, and clips.

The levels asserted are the shipped model's measured ones less a margin. Issue 10's target is 97 % held-out image QA
with no question type below 90 %; the shipped model scores 99.5 % (every type 97.5-100 %) and 74 % text QA on 200
questions per type, and 99.3 % (every type >= 95 %) and 66.4 % on this test's 20 per type, which are deterministic
(seed 0 draws harder text questions: 75.7 % on 50 per type). The thresholds catch a broken loader, a lost part, bad
bf16 weights or a weaker retrained model, not one unlucky answer.

Issue 11's video target is 90 % held-out on questions that need time, the same questions about shuffled frames near
chance or below; the shipped model scores 94.3 % on 50 per type and 95 % on this test's 20 per type (fp32 CPU),
shuffled 37.9 % against a chance of 50 %. It misses some colour changes of stars (70 % of colour changes; every miss
is a star said to stay its final colour), which the previous model (100 %) did not.

Issue 12's speech targets are a WER of at most 8 % on held-out sentences in the held-out voice, and 90 % on spoken
questions about held-out pictures. The shipped model (the recipe's speech parts continued with SpecAugment,
`configs/demo/speech_adapter_continue.yaml`) transcribes at 0.5 % WER (200 per type, seed 1) and answers 94.6 % of the
spoken questions: both are met. Count questions are its weak row (83 %): the held-out voice drops /h/ ("'ow many").
On this test's 20 per type: WER 0.3 %, spoken QA 92.1 % (count 65 %, relative position 90 %).
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mm_llama.api import Assistant
from mm_llama.evaluation.runner import evaluate
from mm_llama.model import MMLlama

MODEL = Path(__file__).resolve().parents[1] / "mm_llama" / "demo_model"


def test_files_are_bf16_and_within_the_size_budget():
    files = sorted(MODEL.glob("*.safetensors"))
    assert {f.name for f in files} == {"trunk.safetensors", "vision.safetensors", "vision_projection.safetensors",
                                       "image_adapter.safetensors", "media.safetensors", "video_adapter.safetensors",
                                       "speech_encoder.safetensors", "speech_adapter.safetensors"}
    assert max(f.stat().st_size for f in files) <= 20 * 10**6
    assert sum(f.stat().st_size for f in MODEL.iterdir()) <= 40 * 10**6
    for f in files:
        with safe_open(f, "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}, f.name


def test_loaded_by_name_and_answers_held_out_questions():
    model = MMLlama.from_pretrained("demo", dtype=torch.float32)
    assert model.source == MODEL and model.config.vision.tile_size == 84
    report = evaluate(Assistant.for_model(model), n_per_type=20, seed=0, progress=False).to_json()["tasks"]
    # Chance: about 1 in 9 for a position, 1 in 6 for a colour, 1 in 2 for yes/no.
    assert report["text-qa"]["accuracy"] >= 0.6, report["text-qa"]  # 66.4 %
    assert report["image-qa"]["accuracy"] >= 0.95, report["image-qa"]
    assert len(report["image-qa"]["types"]) == 7
    for qtype, row in report["image-qa"]["types"].items():  # 95-100 % each on these 20
        assert row["n"] == 20 and row["accuracy"] >= 0.85, (qtype, report["image-qa"])


def test_answers_held_out_clip_questions_that_need_time_and_fails_them_on_shuffled_frames():
    model = MMLlama.from_pretrained("demo", dtype=torch.float32)
    assert model.config.video_adapter.n_frames == 16
    report = evaluate(Assistant.for_model(model), n_per_type=20, seed=0, tasks=["video-qa", "video-qa-shuffled"],
                      progress=False).to_json()["tasks"]
    video, shuffled = report["video-qa"], report["video-qa-shuffled"]
    assert video["chance"] == pytest.approx(0.5, abs=0.01) and len(video["types"]) == 7
    assert video["accuracy"] >= 0.85, video  # 95 %
    # Events, on these 20: motion and disappearance 100 %, colour change 70 % (the stars, see above).
    for qtype, floor in (("motion", 0.75), ("colour change", 0.6), ("disappearance", 0.75)):
        assert video["types"][qtype]["accuracy"] >= floor, (qtype, video)
    # The same questions with the frames out of order: an order-blind model would score the chance column; this one
    # reads the false order it is given (37.9 %; events 15-20 %).
    assert shuffled["accuracy"] <= shuffled["chance"] - 0.05, shuffled
    for qtype in ("motion", "colour change", "disappearance"):
        assert shuffled["types"][qtype]["accuracy"] <= 0.4, (qtype, shuffled)


def test_transcribes_held_out_speech_and_answers_spoken_questions_about_pictures():
    model = MMLlama.from_pretrained("demo", dtype=torch.float32)
    assert model.config.speech_encoder.n_layers == 6 and model.config.speech_adapter.dim == 256
    report = evaluate(Assistant.for_model(model), n_per_type=20, seed=0, tasks=["asr", "spoken-qa"],
                      progress=False).to_json()["tasks"]
    asr, spoken = report["asr"], report["spoken-qa"]
    # Held-out sentences in the held-out voice: WER 0.3 % on these 20 + 20 (0 % captions, 1.3 % questions).
    assert asr["n"] == 40 and asr["wer"] <= 0.04, asr
    assert asr["types"]["caption"]["wer"] <= 0.02, asr
    # The question spoken, no text: 92.1 % on these 20 per type, count 65 % (see the module's docstring).
    assert spoken["n"] == 140 and spoken["accuracy"] >= 0.88, spoken
    for qtype, row in spoken["types"].items():
        assert row["accuracy"] >= (0.5 if qtype == "count" else 0.85), (qtype, spoken)


def test_a_batch_answers_what_one_by_one_answers():
    # Image and text questions mixed in one batch, prompts of different lengths: greedy answers equal `ask`'s.
    from mm_llama.errors import InputError
    from mm_llama.evaluation.tasks import SUITES

    # Clips and spoken questions (with their pictures) join them: a batch of every input the model takes.
    assistant = Assistant.from_pretrained("demo", dtype=torch.float32)
    tasks = {task.name: task for task in SUITES["shapes"]}
    text, image, video, spoken = (tasks[name].items(1, seed=5) for name in ("text-qa", "image-qa", "video-qa",
                                                                             "spoken-qa"))
    items = [x for group in zip(image, text, video, spoken, strict=True) for x in group][:16]
    assert {item.video is not None for item in items} == {item.audio is not None for item in items} == {True, False}
    batched = assistant.ask_batch([item.text for item in items], images=[item.image for item in items],
                                  videos=[item.video for item in items], audios=[item.audio for item in items],
                                  max_new_tokens=48)
    alone = [assistant.ask(item.text, **item.media(), max_new_tokens=48) for item in items]
    assert batched == alone and len(set(batched)) > 8
    with pytest.raises(InputError, match="non-empty list"):
        assistant.ask_batch([])
    with pytest.raises(InputError, match="one entry .* per question: 1 question"):
        assistant.ask_batch(["Is there a star?"], images=[None, None])
