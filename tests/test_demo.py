"""The Gradio demo (`mm-llama demo`): the page in a real browser (Debian's chromium through playwright), its `/chat`
API through gradio_client, the chat function's answers to bad uploads and model errors, a text-only model, spoken
questions (an uploaded file and the microphone, espeak-ng's speech to the embedded model), and what the server
refuses to serve."""

import io
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from conftest import espeak_wave, make_clip, make_speech_model, make_video_model
from mm_llama.api import Assistant
from mm_llama.demo import TEXT_ONLY, _write_examples, build_demo, chat_fn, clip_examples, launch
from mm_llama.errors import InputError, MMLlamaError

QUESTION = "How many shapes are there?"
UPLOAD_MB = 0.25  # the served demo's limit: small files show both the chat's message and gradio's own ceiling (x4)


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(image checkpoint, its trunk): a debug trunk that has seen the shapes-world language (stage lm, 120 steps, so
    that answers are words rather than random bytes the page would render as markdown), then 3 steps of stage
    image-adapter on it."""
    from mm_llama.config import from_dict
    from mm_llama.data.synth_image import synth_image
    from mm_llama.llama import LlamaConfig
    from mm_llama.train.checkpoint import latest_checkpoint
    from mm_llama.train.image_adapter import ImageAdapterStage, ImageAdapterStageConfig
    from mm_llama.train.lm import LMStage, LMStageConfig
    from mm_llama.train.loop import train

    root = tmp_path_factory.mktemp("demo-ckpt")
    data = {"shards": str(corpus), "tokenizer": str(corpus / "tokenizer.model"), "seq_len": 64, "shuffle_buffer": 50}
    config = from_dict(LMStageConfig, {"model": vars(LlamaConfig.preset("debug")), "data": data, "train": {
        "out_dir": str(root / "lm"), "steps": 120, "lr": 3e-3, "warmup_steps": 3, "checkpoint_every": 120,
        "device": "cpu"}})
    train(LMStage(config), config.train)
    trunk = latest_checkpoint(root / "lm")
    shapes = root / "shapes"
    synth_image(shapes, 40, seed=0, shard_size=40)
    data = {"shards": str(shapes), "tokenizer": str(shapes / "tokenizer.model"), "tile_size": 28, "max_tiles": 4,
            "seq_len": 128, "batch_size": 8, "shuffle_buffer": 10}
    config = from_dict(ImageAdapterStageConfig, {
        "trunk": str(trunk), "vision": "debug", "adapter": {"n_layers": 2}, "data": data,
        "train": {"out_dir": str(root / "run"), "steps": 3, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 3,
                  "device": "cpu"}})
    train(ImageAdapterStage(config), config.train)
    return latest_checkpoint(root / "run"), trunk


@pytest.fixture(scope="module")
def assistant(checkpoints) -> Assistant:
    return Assistant.from_pretrained(checkpoints[0], dtype=torch.float32)  # what the CLI loads on the CPU (auto)


@pytest.fixture(scope="module")
def shapes_png(tmp_path_factory) -> Path:
    """A shapes-world image, drawn as the demo draws its examples."""
    return Path(_write_examples(tmp_path_factory.mktemp("png"), n=1)[0]["files"][0])


@pytest.fixture(scope="module")
def held_out_scene(tmp_path_factory) -> tuple[Path, str]:
    """The first held-out shapes-world scene of seed 0 as a PNG, and the world's answer to QUESTION about it: what
    the served demo (the embedded model) must say."""
    from mm_llama.data.world import random_scene
    from mm_llama.data.world_draw import draw_scene
    from mm_llama.data.world_language import questions

    rng = random.Random(0)
    scene = random_scene(rng, "heldout")
    path = tmp_path_factory.mktemp("held-out") / "scene.png"
    draw_scene(scene, 84, rng).save(path)
    (truth,) = [q.answer for q in questions(scene, "count") if q.question == QUESTION]
    return path, truth


@pytest.fixture(scope="module")
def speech_checkpoint(tmp_path_factory) -> Path:
    """A random model with an image encoder and a speech encoder (`make_speech_model`)."""
    return make_speech_model(tmp_path_factory.mktemp("speech-model") / "model")


@pytest.fixture(scope="module")
def speech_assistant(speech_checkpoint) -> Assistant:
    return Assistant.from_pretrained(speech_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def spoken_question(tmp_path_factory) -> Path:
    """QUESTION spoken by espeak-ng, as a 22.05 kHz 16-bit WAV (1.7 s)."""
    path = tmp_path_factory.mktemp("spoken") / "question.wav"
    soundfile.write(path, *espeak_wave(QUESTION))
    return path


@pytest.fixture(scope="module")
def expected(assistant, shapes_png) -> str:
    answer = assistant.ask(QUESTION, image=shapes_png)  # greedy: the page must show exactly this
    assert answer.strip()
    return answer


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def corrupt_png(tmp_path: Path) -> str:
    return write(tmp_path / "corrupt.png", random.Random(0).randbytes(2000))


def ask(chat, text: str, *files) -> list[str]:
    return list(chat({"text": text, "files": [str(f) for f in files]}, []))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mm_llama_command() -> list[str]:
    script = Path(sys.executable).with_name("mm-llama")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mm_llama.cli"]


# The chat function, called directly.

def test_answers_stream_and_equal_ask(assistant, shapes_png, expected):
    chat = chat_fn(assistant)
    pieces = ask(chat, QUESTION, shapes_png)
    assert pieces[-1] == expected and len(pieces) > 1
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))  # the growing answer
    # A stopped answer (gradio closes the generator) frees the model; two at once take turns with its caches.
    stopped = chat({"text": QUESTION, "files": [str(shapes_png)]}, [])
    next(stopped)
    stopped.close()
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(ask(chat, QUESTION, shapes_png)[-1])) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == [expected, expected]


def test_bad_uploads_are_answered_in_the_chat(assistant, shapes_png, tmp_path):
    chat = chat_fn(assistant, max_upload_mb=0.01)  # 10,485 bytes
    for name in ("notes.txt", "speech.m4a", "no-suffix"):
        (message,) = ask(chat, QUESTION, write(tmp_path / name, b"RIFF....WAVE" + bytes(100)))
        assert message.startswith("⚠️ ") and f"{name} is not an image this demo reads" in message
        assert "PNG, JPEG" in message and "0.01 MB" in message
    (message,) = ask(chat, QUESTION, write(tmp_path / "big.png", bytes(20_000)))
    assert "big.png is 0.0191 MB, over the upload limit" in message and "at most 0.01 MB" in message
    (message,) = ask(chat, QUESTION, corrupt_png(tmp_path))
    assert "corrupt.png cannot be read as an image: it is corrupt, truncated" in message
    png = shapes_png.read_bytes()
    truncated = write(tmp_path / "truncated.png", png[: len(png) // 2])  # a valid header, half the pixels
    assert "truncated.png cannot be read as an image" in ask(chat, QUESTION, truncated)[0]
    # One bad file among good ones is named; nothing is asked of the model.
    (message,) = ask(chat, QUESTION, shapes_png, tmp_path / "corrupt.png")
    assert "corrupt.png cannot be read" in message
    (message,) = ask(chat_fn(assistant, max_pixels=1000), QUESTION, shapes_png)
    assert "shapes-0.png has 84x84 pixels, more than the limit of 1,000" in message
    assert ask(chat, "", shapes_png) == ["⚠️ Type a question about the image."]
    with pytest.raises(InputError, match="max_upload_mb must be a number > 0"):
        chat_fn(assistant, max_upload_mb=0)


def test_model_errors_are_answered_in_the_chat(assistant, shapes_png):
    chat = chat_fn(assistant)
    (message,) = ask(chat, QUESTION, *[shapes_png] * 9)
    assert message == "⚠️ sample 0 has 9 images, more than the 8 accepted"
    (message,) = ask(chat, "Why? " * 100)  # 500 byte tokens: the debug trunk's context is 256
    assert message.startswith("⚠️ the prompt of") and "leaves no room for an answer" in message


def test_a_video_is_answered_as_ask_answers_it(tmp_path):
    video_model = make_video_model(tmp_path / "model")
    clip = make_clip(tmp_path / "clip.mp4", seed=0)
    video_assistant = Assistant.from_pretrained(video_model, dtype=torch.float32)
    chat = chat_fn(video_assistant, max_new_tokens=6, max_upload_mb=0.01)
    streamed = ask(chat, "What appears?", clip)
    assert streamed[-1] == video_assistant.ask("What appears?", video=clip, max_new_tokens=6) and len(streamed) >= 1
    assert ask(chat, "", clip) == ["⚠️ Type a question about the video."]
    assert ask(chat, "What appears?", clip, clip) == ["⚠️ Upload one video per question."]
    (message,) = ask(chat, "What appears?", write(tmp_path / "notes.mp4", b"not a video at all"))
    assert message.startswith("⚠️ ") and "notes.mp4" in message and str(tmp_path) not in message
    (message,) = ask(chat, "What appears?", write(tmp_path / "big.mp4", bytes(20_000)))
    assert "big.mp4 is 0.0191 MB, over the upload limit" in message and "MP4, MOV" in message


def test_an_image_model_says_so_for_a_video(assistant, tmp_path):
    (message,) = ask(chat_fn(assistant), QUESTION, make_clip(tmp_path / "clip.mp4", seed=0))
    assert message.startswith("⚠️ This model has no video adapter: it answers about images and text")


def test_a_spoken_question_is_answered_as_ask_answers_it(speech_assistant, spoken_question, shapes_png):
    chat = chat_fn(speech_assistant, max_new_tokens=6)
    streamed = ask(chat, "", spoken_question)  # no text: the question is the audio
    assert streamed[-1] == speech_assistant.ask(audio=str(spoken_question), max_new_tokens=6) and len(streamed) > 1
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False))
    # Text, an image and audio together, in any order of upload.
    answer = speech_assistant.ask("What colour is it?", image=shapes_png, audio=str(spoken_question), max_new_tokens=6)
    assert ask(chat, "What colour is it?", spoken_question, shapes_png)[-1] == answer
    assert ask(chat, "", shapes_png) == ["⚠️ Type a question about the image, or ask it aloud (the microphone, or an "
                                         "audio file)."]
    demo = build_demo(speech_assistant)
    assert demo.textbox.sources == ["upload", "microphone"] and "Ask aloud" in demo.description


def test_bad_audio_is_answered_in_the_chat(speech_assistant, spoken_question, tmp_path):
    chat = chat_fn(speech_assistant, max_upload_mb=0.1)
    (message,) = ask(chat, QUESTION, spoken_question, spoken_question)
    assert message == "⚠️ Send one audio file per question (one upload or one recording)."
    (message,) = ask(chat, "", write(tmp_path / "broken.wav", b"these are words, not audio"))
    assert message.startswith("⚠️ broken.wav cannot be read as audio: it is corrupt, truncated or not really audio")
    assert "WAV, FLAC, OGG, Opus, MP3 or AIFF audio file" in message and str(tmp_path) not in message
    (message,) = ask(chat, "", write(tmp_path / "big.flac", bytes(120_000)))
    assert message.startswith("⚠️ big.flac is 0.114 MB, over the upload limit; upload a PNG, JPEG")
    (message,) = ask(chat_fn(speech_assistant, max_audio_seconds=1), "", spoken_question)
    assert message == "⚠️ question.wav is longer than 1 s, the longest audio this demo takes; cut it."
    with soundfile.SoundFile(tmp_path / "hour.flac", "w", 8000, 1, format="FLAC") as f:  # an hour in 90 KB
        for _ in range(60):
            f.write(np.zeros(8000 * 60, dtype=np.int16))
    (message,) = ask(chat, "", tmp_path / "hour.flac")  # refused before the model decodes it
    assert message == "⚠️ hour.flac is longer than 600 s, the longest audio this demo takes; cut it."
    # What the model refuses is said with the file's name, not gradio's path of the upload.
    soundfile.write(tmp_path / "click.wav", [0.5, -0.5, 0.5], 16_000)
    (message,) = ask(chat, "", tmp_path / "click.wav")
    assert message.startswith("⚠️ audio file click.wav has 3 samples") and str(tmp_path) not in message
    (message,) = ask(chat, "", write(tmp_path / "notes.txt", b"hi"))
    assert message.startswith("⚠️ notes.txt is not a file this demo reads; upload a PNG, JPEG")
    assert "WAV, FLAC" in message


def test_a_model_without_speech_says_so_for_audio(assistant, spoken_question, shapes_png, tmp_path):
    (message,) = ask(chat_fn(assistant), "", spoken_question)
    assert message.startswith("⚠️ This model has no speech encoder: it does not take audio; type your question")
    assert build_demo(assistant).textbox.sources == ["upload"]  # no microphone
    hears_only = Assistant.from_pretrained(make_speech_model(tmp_path / "model", vision=False), dtype=torch.float32)
    (message,) = ask(chat_fn(hears_only), QUESTION, spoken_question, shapes_png)
    assert message.startswith("⚠️ This model has no image encoder: it takes text and audio; upload a WAV, FLAC")


def test_a_text_only_model_answers_text_and_says_so_for_files(checkpoints, shapes_png, spoken_question):
    trunk = Assistant.from_pretrained(checkpoints[1], dtype=torch.float32)
    chat = chat_fn(trunk)
    assert ask(chat, QUESTION, shapes_png) == [f"⚠️ {TEXT_ONLY}"] == ask(chat, "", spoken_question)
    assert "answers text only" in TEXT_ONLY
    assert ask(chat, QUESTION)[-1] == trunk.ask(QUESTION)
    demo = build_demo(trunk, examples=[{"text": QUESTION, "files": [str(shapes_png)]}])
    assert demo.examples == [{"text": QUESTION, "files": []}]  # a text model's examples are its questions


def test_gradio_is_imported_only_by_the_demo(assistant, monkeypatch):
    code = ("import sys, mm_llama, mm_llama.api, mm_llama.cli, mm_llama.demo; "
            "assert 'gradio' not in sys.modules, 'gradio was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: `import gradio` raises ImportError
    with pytest.raises(MMLlamaError, match=r'the demo needs gradio.*pip install "mm-llama\[demo\]"'):
        build_demo(assistant)


def test_launch_says_what_is_wrong_before_loading_the_model(checkpoints):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The command prints these as one line and exits with status 2.
        with pytest.raises(InputError, match=rf"cannot listen on 127.0.0.1:{port}: .*is port {port} in use\?"):
            launch(checkpoints[0], port=port)
    with pytest.raises(InputError, match=r"dtype must be 'auto', 'bf16', 'fp16', 'fp32' or a torch.dtype, got 'fp8'"):
        launch(checkpoints[0], port=free_port(), dtype="fp8")
    with pytest.raises(InputError, match="max_upload_mb must be a number > 0, got -1"):
        launch(checkpoints[0], max_upload_mb=-1)


# The served demo: the real command, a browser, the API.

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mm-llama demo` (the embedded model: no --checkpoint) on a free port, in a folder of its own with TMPDIR of its
    own; yields its URL. On the way out:
    SIGTERM ends it with status 0, its private folder is gone and it wrote nothing where it ran."""
    yield from serve(tmp_path_factory)


def serve(tmp_path_factory, *args: str):
    """Run `mm-llama demo *args` as `server` says; yields its URL once, then checks how it ended."""
    cwd, tmp = tmp_path_factory.mktemp("demo-cwd"), tmp_path_factory.mktemp("demo-tmp")
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    log = tmp_path_factory.mktemp("demo-log") / "stderr.txt"  # a file: a full pipe would stall the server
    with log.open("w") as stderr:
        process = subprocess.Popen(mm_llama_command() + [
            "demo", "--port", str(free_port()), "--max-upload-mb",
            str(UPLOAD_MB), *args], stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=cwd, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("http://" in line for line in lines):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo did not print its URL (status {process.poll()}): {''.join(lines)}"
                            f"{log.read_text()}")
            time.sleep(0.1)
        url = next(line for line in lines if "http://" in line).split()[-1]
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        process.terminate()
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert status == 0, log.read_text()
    assert not list(tmp.glob("mm-llama-demo-*")), "the private folder of uploads and examples was left behind"
    assert not list(cwd.iterdir()), f"the demo wrote {list(cwd.iterdir())} where it ran"


def local_only(page, server: str) -> list[str]:
    """Let `page` reach `server` only; the list fills with every other URL it asked for (none should be)."""
    elsewhere: list[str] = []

    def route(request_route):
        if request_route.request.url.startswith(server):
            request_route.continue_()
        else:
            elsewhere.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    return elsewhere


def test_the_page_in_a_browser(server, held_out_scene, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; CI installs it)")
    from playwright.sync_api import expect, sync_playwright

    too_large = write(tmp_path / "too-large.png", bytes(int(0.3 * 2**20)))
    over_ceiling = write(tmp_path / "over-ceiling.png", bytes(4 * int(UPLOAD_MB * 2**20) + 1))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1800})  # tall: the screenshot shows it all
            elsewhere = local_only(page, server)
            page.goto(server)
            upload, textbox = page.locator("input[type=file]"), page.locator("textarea")
            answers = page.locator("[data-testid=bot]")

            def send(text: str, file: str) -> str:
                """Upload `file`, ask `text`, wait for the answer to finish streaming; the answer shown."""
                n = answers.count()
                upload.set_input_files(file)
                expect(page.locator("[aria-label='File thumbnail']")).to_have_count(1)  # uploaded
                textbox.fill(text)
                textbox.press("Enter")
                expect(answers).to_have_count(n + 1, timeout=60_000)
                expect(textbox).to_be_editable(timeout=60_000)  # the textbox is disabled while the answer streams
                return answers.nth(n).inner_text()

            scene_png, truth = held_out_scene
            assert " ".join(send(QUESTION, str(scene_png)).split()) == truth  # the embedded model is right
            shown = send("What is this?", corrupt_png(tmp_path))
            assert "corrupt.png cannot be read as an image: it is corrupt, truncated" in shown
            shown = send("And this?", write(tmp_path / "notes.txt", b"hi"))  # the embedded model takes both media
            assert "notes.txt is not a file this demo reads; upload a PNG, JPEG" in shown and "MP4, MOV" in shown
            assert "too-large.png is 0.3 MB, over the upload limit" in send("And this?", too_large)
            # Over gradio's own ceiling the upload never starts: gradio's error toast, nothing in the chat.
            n = answers.count()
            upload.set_input_files(over_ceiling)
            expect(page.get_by_text("File(s) exceed the maximum allowed size of 1.0 Mb")).to_be_visible()
            page.screenshot(path=tmp_path / "demo.png")  # a test artifact: the conversation and the toast
            assert answers.count() == n
            expect(page.get_by_text(QUESTION)).to_have_count(1)  # earlier turns stay on the page
        finally:
            browser.close()
    assert not elsewhere, f"the page asked for something other than the demo: {elsewhere}"


def test_a_video_question_in_a_browser(server):
    """A held-out clip uploaded on the embedded model's page, with a question that needs time: the page shows the
    right answer, `Assistant.ask`'s for the same clip."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; CI installs it)")
    from playwright.sync_api import expect, sync_playwright

    from mm_llama.evaluation.tasks import suite_tasks

    url = server
    item = suite_tasks("shapes", ["video-qa"])[0].items(1, seed=2)[0]  # the blue square moves right
    assert (item.qtype, item.answer) == ("motion", "The blue square moves to the right.")
    clip = item.video
    expected = Assistant.from_pretrained("demo", dtype=torch.float32).ask(item.question, video=clip)
    assert expected == item.answer
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(url)
            answers, textbox = page.locator("[data-testid=bot]"), page.locator("textarea")
            page.locator("input[type=file]").set_input_files(str(clip))
            expect(page.locator("[aria-label='File thumbnail']")).to_have_count(1)
            textbox.fill(item.question)
            textbox.press("Enter")
            expect(answers).to_have_count(1, timeout=60_000)
            expect(textbox).to_be_editable(timeout=60_000)
            assert " ".join(answers.nth(0).inner_text().split()) == " ".join(expected.split())
        finally:
            browser.close()


def test_a_spoken_question_in_a_browser(server, spoken_question, tmp_path):
    """A spoken question sent with no text to the embedded model, uploaded as a WAV, then recorded with the
    microphone (Chromium's fake capture device playing the same WAV): the page shows what `Assistant.ask` answers for
    the uploaded file, and for the recording as the page uploaded it (gradio's page turns the browser's recording
    into a 44.1 kHz 16-bit WAV)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; CI installs it)")
    import httpx
    from playwright.sync_api import expect, sync_playwright

    url, model = server, Assistant.from_pretrained("demo", dtype=torch.float32)

    microphone = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={spoken_question}"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", *microphone])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1200})
            context.grant_permissions(["microphone", "clipboard-read", "clipboard-write"])
            page = context.new_page()
            elsewhere = local_only(page, url)
            page.goto(url)
            answers, textbox = page.locator("[data-testid=bot]"), page.locator("textarea")

            def send() -> str:
                """Send the attached audio with no text; the answer as the page holds it (what its copy button
                copies, before any markdown rendering)."""
                n = answers.count()
                expect(page.locator("[aria-label='File thumbnail']")).to_have_count(1)
                expect(textbox).to_have_value("")
                textbox.press("Enter")
                expect(answers).to_have_count(n + 1, timeout=60_000)
                expect(textbox).to_be_editable(timeout=60_000)
                page.get_by_role("button", name="Copy message").last.click()
                return page.evaluate("navigator.clipboard.readText()")

            page.locator("input[type=file]").set_input_files(str(spoken_question))
            assert send() == model.ask(audio=str(spoken_question))
            page.get_by_role("button", name="Record audio").click()
            page.get_by_role("button", name="Start recording").click()
            page.wait_for_timeout(1000)  # about 1.4 s of audio; the 0.25 MB upload limit holds 3 s of the page's WAV
            with page.expect_response(lambda r: r.url.endswith("/gradio_api/upload")) as upload:
                page.get_by_role("button", name="Stop recording").click()
            (recorded,) = upload.value.json()  # the path of the recording on the server
            page.get_by_role("button", name="Attach audio").click()
            shown = send()
        finally:
            browser.close()
    recording = tmp_path / "recording.wav"
    recording.write_bytes(httpx.get(f"{url}gradio_api/file={recorded}").content)
    info = soundfile.info(recording)
    assert (Path(recorded).name, info.format, info.subtype, info.samplerate) == ("audio.wav", "WAV", "PCM_16", 44100)
    assert 0.5 < info.duration < 3
    assert shown == model.ask(audio=str(recording))
    assert not elsewhere, f"the page asked for something other than the demo: {elsewhere}"


def test_the_chat_api_through_gradio_client(server, held_out_scene, spoken_question, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # the client's telemetry (its own flag alone is ignored)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, download_files=False, analytics_enabled=False)
    job = client.submit({"text": QUESTION, "files": [handle_file(held_out_scene[0])]}, api_name="/chat")
    assert job.result(timeout=60) == held_out_scene[1]
    pieces = job.outputs()
    assert len(pieces) > 1 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))
    # The same question spoken (espeak-ng's en-us voice, one of the training accents, at its own rate), no text.
    spoken = client.predict({"text": "", "files": [handle_file(held_out_scene[0]), handle_file(spoken_question)]},
                            api_name="/chat")
    assert spoken == held_out_scene[1]
    message = client.predict({"text": "What is this?", "files": [handle_file(corrupt_png(tmp_path))]},
                             api_name="/chat")
    assert message.startswith("⚠️ corrupt.png cannot be read as an image")


def test_the_server_serves_no_other_file(server):
    import httpx

    for path in ("/etc/passwd", __file__, str(Path.cwd() / "pyproject.toml")):
        assert httpx.get(f"{server}gradio_api/file={path}").status_code == 403, path
    # gradio would fetch a URL itself and stream it back; the demo refuses.
    response = httpx.get(f"{server}gradio_api/file=https://example.com/cat.png")
    assert response.status_code == 403 and response.text == "this demo serves no URLs"
    assert httpx.get(f"{server}gradio_api/file=HTTP%3A//example.com/").status_code == 403
    assert httpx.get(f"{server}monitoring").status_code != 200


def test_example_images_are_shapes_world_pngs(tmp_path):
    examples = _write_examples(tmp_path, n=3)
    assert len(examples) == 3 and all(e["text"].endswith("?") for e in examples)
    for example in examples:
        (path,) = example["files"]
        assert Path(path).parent == tmp_path
        assert Image.open(io.BytesIO(Path(path).read_bytes())).mode == "RGB"


def test_example_clips_ask_what_happens_and_the_embedded_model_answers_them(assistant, tmp_path):
    from mm_llama.data.video import clip_frames

    examples = _write_examples(tmp_path, n=1, clips=2)
    assert len(examples) == 3 and [Path(e["files"][0]).suffix for e in examples] == [".png", ".mp4", ".mp4"]
    clips = clip_examples(tmp_path / "again", 3)  # the same clips and questions, with their answers, and one more
    assert [e["text"] for e, _ in clips[:2]] == [e["text"] for e in examples[1:]]
    demo_model = Assistant.from_pretrained("demo", dtype=torch.float32)
    for example, answer in clips:  # a move, a colour change and a disappearance, answered right
        frames = clip_frames(Path(example["files"][0]).read_bytes(), 16, 84, 1)
        assert frames.shape == (16, 84, 84, 3)
        assert demo_model.ask(example["text"], video=example["files"][0]) == answer, example
    # A model without a video adapter is not offered the clips.
    assert [e["text"] for e in build_demo(assistant, examples=examples).examples] == [examples[0]["text"]]
