"""Asking about a video end to end (issue 11): `Assistant.ask(question, video=path)`, `ask_batch` mixing clips,
pictures and text, and `mm-llama ask --video` — on a small random video model saved in mm-llama's format and clips
of the shapes world encoded to mp4."""

import random
import re

import pytest
import torch
from test_cli import mm_llama

from conftest import make_clip, make_video_model
from encoders.video import Videos
from mm_llama.api import Assistant
from mm_llama.errors import InputError
from mm_llama.media import Media


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    return make_video_model(tmp_path_factory.mktemp("video") / "model")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [make_clip(folder / f"clip{seed}.mp4", seed) for seed in range(2)]


def test_ask_about_a_video_uses_the_clip(video_model, clips):
    assistant = Assistant.from_pretrained(video_model, dtype=torch.float32)
    answer = assistant.ask("What appears?", video=clips[0], max_new_tokens=6)
    assert isinstance(answer, str) and answer == assistant.ask("What appears?", video=str(clips[0]), max_new_tokens=6)
    # The prompt's last logits depend on which clip it is, and the video part opens the user turn.
    prompt, images, videos, _ = assistant._prompt("What appears?", None, None, None, clips[0])
    assert images == [] and videos == [clips[0]] and assistant.tokenizer.video_id in prompt
    model, vision = assistant.model, assistant.model.config.vision
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        last = [model(tokens, Media(videos=Videos.prepare([[clip]], tile_size=vision.tile_size, max_tiles=1,
                                                            n_frames=4)))[0, -1] for clip in clips]
    assert (last[0] - last[1]).abs().max() > 1e-3


def test_a_batch_mixing_clips_pictures_and_text_answers_as_one_by_one(video_model, clips):
    from mm_llama.data.world import random_scene
    from mm_llama.data.world_draw import draw_scene

    assistant = Assistant.from_pretrained(video_model, dtype=torch.float32)
    rng = random.Random(3)
    picture = draw_scene(random_scene(rng), 84, rng)
    questions = ["What appears?", "Is there a circle?", "What colour is the star?", "Which way does it move?"]
    images, videos = [None, picture, None, None], [clips[0], None, None, clips[1]]
    batched = assistant.ask_batch(questions, images=images, videos=videos, max_new_tokens=6)
    alone = [assistant.ask(q, image=i, video=v, max_new_tokens=6) for q, i, v in
             zip(questions, images, videos, strict=True)]
    assert batched == alone
    with pytest.raises(InputError, match="one entry .* per question: 4 question"):
        assistant.ask_batch(questions, videos=[clips[0]])


def test_a_video_for_a_model_without_video_is_refused_before_any_work(clips, tmp_path):
    assistant = Assistant.from_pretrained(make_video_model(tmp_path / "image-model", video=False), dtype=torch.float32)
    with pytest.raises(InputError, match="no video adapter: it answers about images and text only"):
        assistant.ask("What appears?", video=clips[0])


def test_cli_ask_video(video_model, clips, tmp_path):
    result = mm_llama("ask", "--checkpoint", str(video_model), "--video", str(clips[0]), "--max-new-tokens", "6",
                      "What appears?")
    assert result.returncode == 0, result.stderr
    expected = Assistant.from_pretrained(video_model, dtype=torch.float32).ask("What appears?", video=clips[0],
                                                                              max_new_tokens=6)
    assert result.stdout == expected + "\n"
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    for bad, message in ((tmp_path / "missing.mp4", "does not exist"),
                         (not_a_video, "cannot be decoded|no video stream|corrupt")):
        result = mm_llama("ask", "--checkpoint", str(video_model), "--video", str(bad), "What appears?")
        assert result.returncode == 2 and "Traceback" not in result.stderr and str(bad) in result.stderr
        assert re.search(message, result.stderr), result.stderr
    # The embedded demo model, asked about one of the demo page's example clips (a question that needs time).
    from mm_llama.demo import clip_examples

    ((example, answer),) = clip_examples(tmp_path / "example", 1)
    result = mm_llama("ask", "--video", example["files"][0], example["text"])
    assert result.returncode == 0 and result.stdout == answer + "\n", result.stderr


def test_eval_asks_the_video_tasks(video_model):
    from mm_llama.evaluation.runner import evaluate

    assistant = Assistant.from_pretrained(video_model, dtype=torch.float32)
    report = evaluate(assistant, n_per_type=1, tasks=["video-qa", "video-qa-shuffled"], progress=False).to_json()
    assert report["skipped"] == {}
    for task in ("video-qa", "video-qa-shuffled"):
        assert report["tasks"][task]["n"] == 7 and set(report["tasks"][task]["types"]) == {
            "motion", "colour change", "disappearance", "colour", "count", "position", "existence"}
        assert 0.25 <= report["tasks"][task]["chance"] < 1  # questions that need time
