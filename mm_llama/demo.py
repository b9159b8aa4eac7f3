"""A Gradio chat with any checkpoint the `Assistant` loads: `mm-llama demo` or `mm_llama.demo.launch()`.

    pip install "mm-llama[demo]"
    mm-llama demo --checkpoint runs/demo/image_adapter/checkpoints/step_00003000    # then open http://127.0.0.1:7860

A model with an image encoder chats about uploaded images, one with a video adapter also about an uploaded video, one
with a speech encoder also takes a spoken question or message (an uploaded audio file, or recorded with the
microphone; the text may then be empty); a text-only trunk chats in text (an upload it cannot take gets a message
saying so). Answers stream token by token, greedy. Each answer is to the latest message and its media only: earlier
turns stay on screen but are not sent to the model (the small demo models answer one question at a time, and a Llama
3.2 Vision prompt holds the images of one message).

A bad upload (a corrupt image, video or audio file, a file over the size limit, audio longer than MAX_AUDIO_SECONDS, a
file of none of these kinds) and an `MMLlamaError` of the model (too many images, a question longer than the context)
are answered in the chat, never as a stack trace.

The microphone (checked against gradio 6.31's MultimodalTextbox, and in Chromium by the tests): the browser records
with MediaRecorder (WebM/Opus in Chromium and Firefox, MP4 in Safari), then gradio's page decodes the recording itself
and uploads it as `audio.wav`, 16-bit PCM at 44.1 kHz. libsndfile reads that as it reads any uploaded WAV, FLAC,
OGG/Vorbis or Opus, MP3 or AIFF file, so nothing is converted here (libsndfile reads no WebM, which stays a video
suffix).

What the server exposes (checked against gradio 6.31): the page, its API (`/chat`, `/gradio_api/info`,
`/gradio_api/upload`) and `/gradio_api/file=PATH` for files under gradio's upload folder, its example cache
(`GRADIO_EXAMPLES_CACHE`, default `./.gradio/cached_examples`) and `allowed_paths`. `launch` makes the upload folder a
private temporary folder (gradio's default, `/tmp/gradio`, is shared by every gradio app of the machine), allows only
the examples' folder, refuses `/file=http(s)://...` (which gradio would otherwise fetch from public hosts and stream
back), turns off the `/monitoring` page, the run history, SSR, MCP, the PWA and telemetry, never shares
(`share=False`) and listens on 127.0.0.1 unless told otherwise.

Upload size: gradio's `max_file_size` is checked in the browser before the upload starts and again by the server, and a
file over it gets only gradio's error toast ("File(s) exceed the maximum allowed size of 40.0 Mb: "x.png""), never
reaching the chat. So `launch` sets `max_file_size` to UPLOAD_CEILING times `max_upload_mb`, the chat function refuses
files over `max_upload_mb` with a message in the chat, and only files over the ceiling get the toast alone. A recording
is uploaded as a file is, under the same limits (a 44.1 kHz 16-bit mono WAV: 10 MB is about two minutes).

gradio is imported only inside the functions here, so `import mm_llama` never needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mm_llama.errors import InputError, MMLlamaError

if TYPE_CHECKING:
    import gradio as gr

    from mm_llama.api import Assistant

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")  # what libsndfile 1.2 reads
UPLOAD_CEILING = 4  # gradio's max_file_size, in units of max_upload_mb: see the module docstring
MAX_PIXELS = 50_000_000  # a 50-megapixel photo; the decoded RGB image is then 150 MB of memory at most
# Ten minutes; a 10 MB FLAC of silence holds days of audio, so the length is counted before the model decodes it all.
MAX_AUDIO_SECONDS = 600
TEXT_ONLY = ("This model answers text only (it has no image or speech encoder): ask your question in text, without "
             "a file.")
IMAGES_SAID = "a PNG, JPEG, GIF, BMP, WebP or TIFF image"
VIDEOS_SAID = "an MP4, MOV, WebM, MKV or AVI video"
AUDIO_SAID = "a WAV, FLAC, OGG, Opus, MP3 or AIFF audio file"


def _gradio():
    try:
        import gradio
    except ImportError as e:
        raise MMLlamaError('the demo needs gradio, which is not installed: pip install "mm-llama[demo]"') from e
    return gradio


def _write_examples(folder: Path, n: int = 3, clips: int = 0) -> list[dict]:
    """`n` shapes-world scenes as PNGs in `folder`, with a question each, then `clips` clips as mp4s with a question
    that needs time each (what happens, or in what order): [{"text": question, "files": [file path]}].

    The one place the demo draws shapes-world images (the synth_image API is still moving)."""
    from mm_llama.data.synth_image import image_sample

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    examples = []
    for i in range(n):
        sample = image_sample(rng)
        path = folder / f"shapes-{i}.png"
        path.write_bytes(sample["png"])
        examples.append({"text": json.loads(sample["json"])["question"], "files": [str(path)]})
    return examples + [example for example, _ in clip_examples(folder, clips)]


def clip_examples(folder: Path, n: int) -> list[tuple[dict, str]]:
    """`n` clips written to `folder`, each with a question of the next type of ("motion", "colour change",
    "disappearance") that needs time: [({"text": question, "files": [mp4 path]}, the right answer)]."""
    from mm_llama.data.world_clips import random_clip
    from mm_llama.data.world_time import time_question
    from mm_llama.data.world_video import encode_mp4, render_clip

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    examples = []
    while len(examples) < n:
        qtype = ("motion", "colour change", "disappearance")[len(examples) % 3]
        clip = random_clip(rng)
        try:
            qa, _ = time_question(clip, rng, "train", qtype)
        except InputError:  # this clip has no such event: draw another
            continue
        video = render_clip(clip, rng)
        path = folder / f"clip-{len(examples)}.mp4"
        path.write_bytes(encode_mp4(video.frames, video.fps))
        examples.append(({"text": qa.question, "files": [str(path)]}, qa.answer))
    return examples


def _check_upload_limit(max_upload_mb: object) -> None:
    if isinstance(max_upload_mb, bool) or not isinstance(max_upload_mb, int | float) or not max_upload_mb > 0:
        raise InputError(f"max_upload_mb must be a number > 0, got {max_upload_mb!r}")


def _accepted(max_upload_mb: float, *, images: bool = True, videos: bool = False, audio: bool = False) -> str:
    """What the chat takes, said after what was wrong: "upload a PNG, ... image, ... of at most N MB"."""
    kinds = [said for said, taken in ((IMAGES_SAID, images), (VIDEOS_SAID, videos), (AUDIO_SAID, audio)) if taken]
    if not kinds:  # a text-only model
        return "ask in text, without a file"
    what = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + ", or " + kinds[-1]
    return f"upload {what} of at most {max_upload_mb:g} MB"


def _over_limit(path: str, max_upload_mb: float, accepted: str) -> str | None:
    """The message for a file over the upload limit; None for one within it."""
    size = os.path.getsize(path)
    if size > max_upload_mb * 2**20:  # MB as gradio counts them (max_file_size "10mb" is 10 * 2**20 bytes)
        return f"{Path(path).name} is {size / 2**20:.3g} MB, over the upload limit; {accepted}."
    return None


def _read_upload(path: str, max_upload_mb: float, max_pixels: int, accepted: str):
    """(the RGB image, None), or (None, what is wrong with the uploaded image, said for the chat). `accepted`: what
    the chat takes (`_accepted`), said after what is wrong."""
    from PIL import Image

    from encoders.image_transform import load_image

    name = Path(path).name
    too_large = _over_limit(path, max_upload_mb, accepted)
    if too_large:
        return None, too_large
    corrupt = f"{name} cannot be read as an image: it is corrupt, truncated or not really an image; {accepted}."
    try:
        with warnings.catch_warnings():  # PIL warns of large images; the limit below is the one that decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:  # the size from the header, before decoding
                width, height = header.size
    except Image.DecompressionBombError:
        return None, f"{name} has too many pixels to decode safely; the limit is {max_pixels:,} pixels."
    except (OSError, SyntaxError, ValueError):
        return None, corrupt
    if width * height > max_pixels:
        return None, f"{name} has {width}x{height} pixels, more than the limit of {max_pixels:,}; downscale it first."
    try:
        return load_image(path, max_pixels), None
    except InputError:
        return None, corrupt


def _check_audio(path: str, max_upload_mb: float, max_seconds: float, accepted: str) -> str | None:
    """What is wrong with an uploaded audio file, said for the chat; None when nothing is. The file is read through
    once, 4 MB of samples at a time, up to `max_seconds` (its header's length may lie); the model reads it again."""
    import soundfile

    too_large = _over_limit(path, max_upload_mb, accepted)
    if too_large:
        return too_large
    name = Path(path).name
    frames = 0
    try:
        with soundfile.SoundFile(path) as f:
            block_frames = max(1, 2**20 // f.channels)
            for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):  # (frames, channels)
                frames += len(block)
                if frames > max_seconds * f.samplerate:
                    return f"{name} is longer than {max_seconds:g} s, the longest audio this demo takes; cut it."
    except (soundfile.SoundFileError, RuntimeError):
        return f"{name} cannot be read as audio: it is corrupt, truncated or not really audio; {accepted}."
    if frames == 0:
        return f"{name} has no audio in it (0 s); {accepted}."
    return None


def chat_fn(assistant: Assistant, *, max_upload_mb: float = 10, max_pixels: int = MAX_PIXELS,
            max_audio_seconds: float = MAX_AUDIO_SECONDS, max_new_tokens: int = 256
            ) -> Callable[[dict, list], Iterator[str]]:
    """The demo's chat function: `chat(message, history)` yields the growing answer to `message`.

    Args:
        assistant: an `mm_llama.api.Assistant`.
        max_upload_mb: larger files are refused with a message.
        max_pixels: images with more pixels are refused with a message (from the file header, before decoding).
        max_audio_seconds: longer audio is refused with a message (counted before the model decodes it).
        max_new_tokens: the longest answer in tokens.
    Returns:
        `chat(message, history)`: `message` is gradio's multimodal value {"text": str, "files": [path, ...]}, each
        file an image, a video or audio by its suffix (at most one video and one audio file; with audio, the text may
        be empty: a spoken question); the answer is to `message` alone (`history` is shown, not sent to the model).
        It yields the answer so far after each token, or one message saying what is wrong with the input.
    """
    _check_upload_limit(max_upload_mb)
    config = assistant.model.config
    sees_images, sees_videos = config.vision is not None, config.video_adapter is not None
    hears = config.speech_adapter is not None
    accepted = _accepted(max_upload_mb, images=sees_images, videos=sees_videos, audio=hears)
    lock = threading.Lock()  # the Generator's caches serve one answer at a time (the page and the API may both ask)

    def chat(message: dict, history: list) -> Iterator[str]:
        """Answer the latest message (its text and files) with the model, streamed; earlier turns are not sent."""
        text = (message.get("text") or "").strip()
        files = [f["path"] if isinstance(f, dict) else f for f in message.get("files") or []]
        suffixes = {path: Path(path).suffix.lower() for path in files}
        videos = [path for path in files if suffixes[path] in VIDEO_SUFFIXES]
        audios = [path for path in files if suffixes[path] in AUDIO_SUFFIXES]
        unknown = [path for path in files if suffixes[path] not in IMAGE_SUFFIXES + VIDEO_SUFFIXES + AUDIO_SUFFIXES]
        if files and not (sees_images or hears):
            yield f"⚠️ {TEXT_ONLY}"
            return
        if unknown:
            kind = "a file" if sees_videos or hears else "an image"
            yield f"⚠️ {Path(unknown[0]).name} is not {kind} this demo reads; {accepted}."
            return
        if audios and not hears:
            yield ("⚠️ This model has no speech encoder: it does not take audio; type your question instead "
                   f"({accepted}).")
            return
        if len(audios) < len(files) and not sees_images:
            yield f"⚠️ This model has no image encoder: it takes text and audio; {accepted}."
            return
        if videos and not sees_videos:
            yield (f"⚠️ This model has no video adapter: it answers about {'images, audio' if hears else 'images'} "
                   f"and text; {accepted}.")
            return
        if len(videos) > 1:
            yield "⚠️ Upload one video per question."
            return
        if len(audios) > 1:
            yield "⚠️ Send one audio file per question (one upload or one recording)."
            return
        images = []
        for path in files:
            if path in videos:  # decoding is `read_video`'s, in a process of its own with a timeout
                problem = _over_limit(path, max_upload_mb, accepted)
            elif path in audios:
                problem = _check_audio(path, max_upload_mb, max_audio_seconds, accepted)
            else:
                image, problem = _read_upload(path, max_upload_mb, max_pixels, accepted)
                images.append(image)
            if problem:
                yield f"⚠️ {problem}"
                return
        if not text and not audios:
            about = " about the video" if videos else " about the image" if images else ""
            yield (f"⚠️ Type a question{about}"
                   + (", or ask it aloud (the microphone, or an audio file)." if hears else "."))
            return
        answer = ""
        with lock:
            try:
                for piece in assistant.ask_stream(text or None, images=images or None,
                                                  video=videos[0] if videos else None,
                                                  audio=audios[0] if audios else None, max_new_tokens=max_new_tokens):
                    answer += piece
                    yield answer
            except MMLlamaError as e:  # a video or audio file that does not decode is said with its name
                said = str(e)
                for path in videos + audios:  # gradio's path of the upload says nothing to the user
                    said = said.replace(path, Path(path).name)
                yield (answer + "\n\n" if answer else "") + f"⚠️ {said}"
                return
        if not answer:
            yield "_(the model gave an empty answer)_"

    return chat


def build_demo(assistant: Assistant, *, examples: list[dict] | None = None, max_upload_mb: float = 10,
               max_pixels: int = MAX_PIXELS, max_audio_seconds: float = MAX_AUDIO_SECONDS, max_new_tokens: int = 256,
               title: str = "mm-llama") -> gr.Blocks:
    """The chat page for `assistant`, as a `gr.Blocks` (serve it with `launch`, which also limits uploads).

    Args:
        assistant: an `mm_llama.api.Assistant`.
        examples: clickable inputs [{"text": question, "files": [image or video path]}] (`_write_examples`); the
            files of a text-only model's examples are dropped, and so are the examples with a video for a model
            without a video adapter.
        max_upload_mb, max_pixels, max_audio_seconds, max_new_tokens: as for `chat_fn`.
        title: the page's heading.
    Returns:
        a `gr.Blocks` (a `gr.ChatInterface`) whose chat endpoint is `/chat`; the textbox has a microphone when the
        model has a speech encoder.
    """
    gr = _gradio()
    config = assistant.model.config
    sees_images, sees_videos = config.vision is not None, config.video_adapter is not None
    hears = config.speech_adapter is not None
    if examples and not sees_videos:
        examples = [e for e in examples if not any(Path(f).suffix == ".mp4" for f in e["files"])]
    if examples and not sees_images:
        examples = [{"text": e["text"], "files": []} for e in examples]
    said = [("Upload an image or a video (the paper clip, or drop it on the box) and ask about it." if sees_videos
             else "Upload an image (the paper clip, or drop it on the box) and ask about it." if sees_images
             else "" if hears else "This model answers text only."),
            ("Ask aloud: record with the microphone, or upload an audio file (WAV, FLAC, OGG, MP3); the text may then "
             "be empty." if hears else ""),
            "Answers are greedy and to the latest message only (earlier turns are not sent to the model)."]
    uploads = [kind for kind, taken in (("images", sees_images), ("one video", sees_videos),
                                        ("one audio file", hears)) if taken]
    if uploads:
        listed = ", ".join(uploads[:-1]) + " and " + uploads[-1] if len(uploads) > 1 else uploads[0]
        said.append(f"Uploads: {listed}, each file of at most {max_upload_mb:g} MB.")
    description = " ".join(sentence for sentence in said if sentence)
    textbox = gr.MultimodalTextbox(file_count="multiple", sources=["upload", "microphone"] if hears else ["upload"],
                                   placeholder="Ask a question")
    # No "share" button: it would post the conversation to Hugging Face.
    chatbot = gr.Chatbot(label=title, scale=1, buttons=["copy", "copy_all"])
    return gr.ChatInterface(chat_fn(assistant, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
                                    max_audio_seconds=max_audio_seconds, max_new_tokens=max_new_tokens),
                            multimodal=True, textbox=textbox, chatbot=chatbot, examples=examples or None, title=title,
                            description=description, api_name="chat", analytics_enabled=False,
                            concurrency_limit=1, flagging_mode="never", fill_height=True)


class _RefuseURLFetches:
    """ASGI middleware: 403 for `/file=http(s)://...`, which gradio would fetch from the internet and stream back."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]  # already percent-decoded, as the route sees it
            rest = path.partition("/file=")[2] or path.partition("/file/")[2]
            if rest.lstrip().lower().startswith(("http:", "https:")):
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"this demo serves no URLs"})
                return
        await self.app(scope, receive, send)


def _check_port(host: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"port must be an integer in 1..65535, got {port!r}")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a recently closed port is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e} (is port {port} in use? choose "
                             "another with --port N)") from e


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (kill, a service manager) stops the demo as Ctrl-C does, so that its private folder is deleted."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _private_uploads(folder: Path):
    """Gradio keeps uploads in GRADIO_TEMP_DIR (default /tmp/gradio, shared by every gradio app): use `folder`."""
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before


def launch(checkpoint: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 7860,
           device: str = "auto", dtype: str = "auto", max_upload_mb: float = 10, max_new_tokens: int = 256,
           compile: bool = False) -> None:
    """Serve the chat demo until interrupted (Ctrl-C or SIGTERM); prints the URL once the page can be opened.

    Args:
        checkpoint: any checkpoint directory `Assistant.from_pretrained` loads; None: the embedded demo model.
        host: the address to listen on; 127.0.0.1 serves this machine only (0.0.0.0 serves the network: anyone who
            reaches it can use the model and upload files).
        port: the TCP port; in use: an `InputError` naming it.
        device: "auto" (the GPU if there is one), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto" (bf16 on a GPU, fp32 on the CPU), "bf16", "fp16", "fp32" or a torch.dtype.
        max_upload_mb: the largest file accepted, in MB (larger ones get a message in the chat; gradio refuses
            files over UPLOAD_CEILING times this before they are uploaded).
        max_new_tokens: the longest answer in tokens.
        compile: compile the decode step (CUDA only; see `Assistant`).
    """
    from starlette.middleware import Middleware

    from mm_llama.api import Assistant
    from mm_llama.devices import resolve_device, resolve_dtype

    _gradio()  # a missing gradio is said before the model loads
    _check_upload_limit(max_upload_mb)
    _check_port(host, port)  # before loading the model: a port in use is said at once
    torch_device = resolve_device(device, "device")
    print(f"mm-llama demo: loading {'the demo model' if checkpoint is None else checkpoint} ...", flush=True)
    assistant = Assistant.from_pretrained("demo" if checkpoint is None else checkpoint, device=torch_device,
                                          dtype=resolve_dtype(dtype, torch_device), compile=compile)
    with (_sigterm_as_ctrl_c(), tempfile.TemporaryDirectory(prefix="mm-llama-demo-") as private,
          _private_uploads(Path(private) / "uploads")):
        examples_dir = Path(private) / "examples"
        clips = 2 if assistant.model.config.video_adapter is not None else 0
        demo = build_demo(assistant, examples=_write_examples(examples_dir, clips=clips), max_upload_mb=max_upload_mb,
                          max_new_tokens=max_new_tokens)
        try:
            _, url, _ = demo.launch(
                server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                max_file_size=int(UPLOAD_CEILING * max_upload_mb * 2**20), allowed_paths=[str(examples_dir)],
                app_kwargs={"middleware": [Middleware(_RefuseURLFetches)]}, enable_monitoring=False,
                run_history=False, ssr_mode=False, mcp_server=False, pwa=False, footer_links=["api", "settings"])
        except OSError as e:  # the port was taken between the check and now
            raise InputError(f"cannot listen on {host}:{port}: {e} (choose another port with --port N)") from e
        print(f"mm-llama demo: {url}", flush=True)
        try:
            while demo.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            demo.close()

