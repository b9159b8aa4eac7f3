"""`Assistant`: a composed model, its tokenizer and a generator; it answers questions (`ask`, `ask_stream`) and will
transcribe and speak.

    assistant = Assistant.from_pretrained("Llama-3.2-11B-Vision-Instruct", device="cuda", compile=True)
    print(assistant.ask("What is in the picture?", image="cat.jpg"))

`MMLlama.ask` / `ask_stream` are conveniences that make one per call from the checkpoint directory's tokenizer. Inputs
are checked before any work: an image that cannot be read, more images than accepted, a prompt longer than the
context each raise an `MMLlamaError` naming the input.

This module knows the model only through what it reads of it (`config`, `trunk`, and what `Generator` needs), so it
imports neither `mm_llama.model` nor the checkpoints (`from_pretrained` reaches those when called).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from encoders.image_transform import Images
from mm_llama.errors import InputError
from mm_llama.generate import Generator, Sampling
from mm_llama.media import Media
from mm_llama.paths import checkpoint_path, local_path
from mm_llama.tokenizer import Tokenizer, find_tokenizer

MAX_IMAGES = 8  # images per question: bounds the cross-attention memory (each 4-tile 560-px image is 6,404 tokens)


class Assistant:
    """Answers questions with `model` (an `MMLlama`, on its device and dtype) and `tokenizer`.

    Args:
        compile: compile the decode step with CUDA graphs and the media encoders (GPU only; the first question per
            cache size compiles).
    """

    def __init__(self, model, tokenizer: Tokenizer, *, compile: bool = False):
        vocab = model.config.trunk.vocab_size
        if tokenizer.n_words != vocab:
            raise InputError(f"the tokenizer {tokenizer.name} has {tokenizer.n_words} tokens but the model has "
                             f"{vocab} token embeddings")
        self.model, self.tokenizer = model, tokenizer
        self.generator = Generator(model, compile=compile)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: str | Path | None = None, hf_compat: bool = False,
                        dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu",
                        compile: bool = False) -> Assistant:
        """Load any checkpoint directory `MMLlama.from_pretrained` reads, with its tokenizer.model (or `tokenizer`).

        Args:
            tokenizer: a tokenizer.model file; default: the directory's (or its original/).
            hf_compat, dtype, device: as for `MMLlama.from_pretrained`.
            compile: as for `Assistant`.
        """
        from mm_llama.checkpoints import detect_format, load_mmllama

        path = checkpoint_path(path)
        detect_format(path)  # a missing or unrecognisable directory is the first thing to say
        # The tokenizer next: a missing file should not cost loading the weights.
        tok = Tokenizer.from_file(local_path(tokenizer, "tokenizer")) if tokenizer else _checkpoint_tokenizer(path)
        model = load_mmllama(path, hf_compat=hf_compat, dtype=dtype, device=device)
        return cls(model, tok, compile=compile)

    @classmethod
    def for_model(cls, model) -> Assistant:
        """An assistant with the tokenizer of the directory `model` was loaded from (what `MMLlama.ask` uses)."""
        if model.source is None:
            raise InputError("this model was not loaded by MMLlama.from_pretrained, so its tokenizer is unknown: "
                             "use mm_llama.api.Assistant(model, Tokenizer.from_file(...))")
        return cls(model, _checkpoint_tokenizer(model.source))

    def _prompt(self, question: str, image, images: Sequence | None, system: str | None, video=None
                ) -> tuple[list[int], list, list]:
        """The checked request as chat-format prompt ids, its list of images and its list of videos (0 or 1)."""
        if not isinstance(question, str):
            raise InputError(f"question must be a str, got {type(question).__name__}")
        if image is not None and images is not None:
            raise InputError("pass image=... or images=[...], not both")
        if images is not None and not isinstance(images, list | tuple):
            raise InputError(f"images must be a list of images, got {type(images).__name__} (for one image, pass "
                             "image=...)")
        if system is not None and not isinstance(system, str):
            raise InputError(f"system must be a str or None, got {type(system).__name__}")
        images = [image] if image is not None else list(images or [])
        videos = [] if video is None else [video]
        if images and self.model.config.vision is None:
            raise InputError("this model has no image encoder: it answers text only; ask without an image")
        if videos and self.model.config.video_adapter is None:
            raise InputError("this model has no video adapter: it answers about "
                             f"{'images and text' if self.model.config.vision is not None else 'text'} only; ask "
                             "without a video")
        content: str | list[dict] = question
        if images or videos:  # the media open the user turn, pictures first, as the training chats do
            content = ([{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
                       + [{"type": "text", "text": question.strip()}])
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": content})
        return self.tokenizer.encode_dialog(messages), images, videos

    def _media(self, images: list[list], videos: list[list], max_images: int) -> Media | None:
        """Each question's images and videos (a list per question, maybe empty) as the model's media; None when
        there are none."""
        config = self.model.config
        media = Media()
        if any(images):
            media.images = Images.prepare(images, tile_size=config.vision.tile_size, max_tiles=config.vision.max_tiles,
                                          max_images=max_images)
        if any(videos):
            from encoders.video import Videos

            media.videos = Videos.prepare(videos, tile_size=config.vision.tile_size,
                                          max_tiles=config.vision.max_tiles,
                                          n_frames=config.video_adapter.n_frames, max_videos=1)
        return media if media.images is not None or media.videos is not None else None

    def ask_stream(self, question: str, *, image=None, images: Sequence | None = None, video=None,
                   system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Stream the answer to `question` as text pieces.

        Args:
            question: the user's message (leading and trailing whitespace is dropped).
            image: one image: a path, a PIL image or a uint8 array (H, W, 3); or `images`, a list of them (at most
                8), placed before the question in the user message, as Llama 3.2 Vision's chat format does.
            video: a video file's path (a model with a video adapter): its frames, sampled uniformly over the whole
                clip (`encoders.video`), placed before the question, after any images.
            system: a system prompt.
            max_new_tokens, temperature, top_k, top_p, seed: sampling (`generate.Sampling`); greedy by default.
        """
        prompt, images, videos = self._prompt(question, image, images, system, video)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
        media = self._media([images], [videos], MAX_IMAGES)
        return self.generator.stream_text(self.tokenizer, prompt, sampling, media=media)

    def ask(self, question: str, *, image=None, images: Sequence | None = None, video=None, system: str | None = None,
            max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
            seed: int | None = None) -> str:
        """The whole answer of `ask_stream` as one string."""
        return "".join(self.ask_stream(question, image=image, images=images, video=video, system=system,
                                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed))

    def ask_batch(self, questions: Sequence[str], *, images: Sequence | None = None, videos: Sequence | None = None,
                  system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float = 1.0, seed: int | None = None) -> list[str]:
        """Answer several questions in one batch: what `ask` answers for each, greedy, in a fraction of the time
        (`mm-llama eval` asks this way).

        Args:
            questions: the user messages.
            images: None, or one entry per question: an image (as `ask`'s `image`) or None.
            videos: None, or one entry per question: a video path (as `ask`'s `video`) or None.
            system, max_new_tokens, temperature, top_k, top_p, seed: as `ask`, for every question.
        Returns:
            the answers, in the order of `questions`.
        """
        if not isinstance(questions, list | tuple) or not questions:
            raise InputError(f"questions must be a non-empty list of str, got {questions!r:.80}")
        images = [None] * len(questions) if images is None else images
        videos = [None] * len(questions) if videos is None else videos
        for name, given in (("images", images), ("videos", videos)):
            if not isinstance(given, list | tuple) or len(given) != len(questions):
                raise InputError(f"{name} must be a list with one entry (one {name[:-1]} or None) per question: "
                                 f"{len(questions)} question(s), got {given!r:.80}")
        requests = [self._prompt(q, image, None, system, video)
                    for q, image, video in zip(questions, images, videos, strict=True)]
        media = self._media([request[1] for request in requests], [request[2] for request in requests], 1)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
        answers = self.generator.generate([request[0] for request in requests], sampling,
                                          self.tokenizer.stop_tokens, media)
        return [self.tokenizer.decode(ids) for ids in answers]


def _checkpoint_tokenizer(directory: Path) -> Tokenizer:
    path = find_tokenizer(directory)
    if path is None:
        raise InputError(f"{directory}: no tokenizer.model (looked in the directory and in original/); pass a "
                         "tokenizer file (--tokenizer FILE, or Assistant.from_pretrained(..., tokenizer=FILE))")
    return _load_tokenizer(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, mtime_ns: int) -> Tokenizer:
    """Tokenizers are immutable and the real Llama 3 file takes a while to parse: `MMLlama.ask` reuses them (the
    modification time in the key notices a replaced file)."""
    return Tokenizer.from_file(path)
