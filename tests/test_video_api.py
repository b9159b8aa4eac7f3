"""Asking about a video end to end (issue 11): `Assistant.ask(question, video=path)`, `ask_batch` mixing clips,
pictures and text, and `mm-llama ask --video` — on a small random video model saved in mm-llama's format and clips
of the shapes world encoded to mp4."""

import random
import re
import shutil

import pytest
import torch
from test_cli import mm_llama

from adapters.cross_attention import CrossAttentionConfig
from adapters.video import VideoAdapterConfig
from conftest import randomize_
from encoders.video import Videos
from encoders.vision import VisionConfig
from mm_llama.api import Assistant
from mm_llama.checkpoints import save_mmllama
from mm_llama.data.world_clips import random_clip
from mm_llama.data.world_tokenizer import WORLD_TOKENIZER
from mm_llama.data.world_video import encode_mp4, render_clip
from mm_llama.errors import InputError
from mm_llama.llama import LlamaConfig
from mm_llama.media import Media
from mm_llama.model import MMConfig, MMLlama
from mm_llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    """A random model with a video adapter (open gates) in mm-llama's format, with the world tokenizer."""
    path = tmp_path_factory.mktemp("video") / "model"
    vocab = Tokenizer.from_file(WORLD_TOKENIZER).n_words
    config = MMConfig(trunk=LlamaConfig.preset("debug", vocab_size=vocab, n_layers=4),
                      vision=VisionConfig.preset("debug", max_tiles=1, tile_size=84),
                      image_adapter=CrossAttentionConfig(n_layers=2),
                      video_adapter=VideoAdapterConfig(n_frames=4, group=2, gate_init=0.5))
    torch.manual_seed(0)
    model = randomize_(MMLlama(config), seed=1)
    save_mmllama(model, path)
    shutil.copy(WORLD_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for seed in range(2):
        rng = random.Random(seed)
        video = render_clip(random_clip(rng), rng)
        paths.append(folder / f"clip{seed}.mp4")
        paths[-1].write_bytes(encode_mp4(video.frames, video.fps))
    return paths


def test_ask_about_a_video_uses_the_clip(video_model, clips):
    assistant = Assistant.from_pretrained(video_model, dtype=torch.float32)
    answer = assistant.ask("What appears?", video=clips[0], max_new_tokens=6)
    assert isinstance(answer, str) and answer == assistant.ask("What appears?", video=str(clips[0]), max_new_tokens=6)
    # The prompt's last logits depend on which clip it is, and the video part opens the user turn.
    prompt, images, videos = assistant._prompt("What appears?", None, None, None, clips[0])
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


def test_a_video_for_a_model_without_video_is_refused_before_any_work(clips):
    assistant = Assistant.from_pretrained("demo", dtype=torch.float32)
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
    result = mm_llama("ask", "--video", str(clips[0]), "What appears?")  # the demo model has no video adapter yet
    assert result.returncode == 2 and "no video adapter" in result.stderr


def test_eval_asks_the_video_tasks(video_model):
    from mm_llama.evaluation.runner import evaluate

    assistant = Assistant.from_pretrained(video_model, dtype=torch.float32)
    report = evaluate(assistant, n_per_type=1, tasks=["video-qa", "video-qa-shuffled"], progress=False).to_json()
    assert report["skipped"] == {}
    for task in ("video-qa", "video-qa-shuffled"):
        assert report["tasks"][task]["n"] == 4 and set(report["tasks"][task]["types"]) == {
            "motion", "colour change", "appearance", "disappearance"}
