"""`Assistant`: a composed model, its tokenizer and a generator; it answers questions (`ask`, `ask_stream`, typed
or spoken) and transcribes speech (`transcribe`); it will speak.

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
from mm_llama.speech_prompts import system_prompt
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

    def _prompt(self, question: str | None, image, images: Sequence | None, system: str | None, video=None,
                audio=None) -> tuple[list[int], list, list, list[torch.Tensor]]:
        """The checked request as chat-format prompt ids, its images, its videos (0 or 1) and its speech chunks."""
        if question is None and audio is None:
            raise InputError("give a question, audio with a spoken question (audio=...), or both")
        if question is not None and not isinstance(question, str):
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
        config = self.model.config
        if images and config.vision is None:
            raise InputError("this model has no image encoder: it answers text only; ask without an image")
        if videos and config.video_adapter is None:
            raise InputError("this model has no video adapter: it answers about "
                             f"{'images and text' if config.vision is not None else 'text'} only; ask "
                             "without a video")
        chunks = self._speech_chunks(audio) if audio is not None else []
        # The media open the user turn, pictures first, then the clip, then the speech, as the training chats do.
        content: str | list[dict] = question or ""
        if images or videos or chunks:
            content = ([{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
                       + self._speech_parts(chunks)
                       + ([{"type": "text", "text": question.strip()}] if question else []))
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": content})
        return self.tokenizer.encode_dialog(messages), images, videos, chunks

    def _speech_chunks(self, audio) -> list[torch.Tensor]:
        """`audio`'s 16 kHz chunks, each at most the model's `speech_adapter.max_seconds` (a span each), without
        silent ones; an InputError when all are silent (nothing was said)."""
        from encoders.audio import audio_name
        from encoders.utterances import SILENCE_DBFS, audio_chunks, is_silent

        config = self.model.config.speech_adapter
        if config is None:
            raise InputError("this model has no speech encoder: it does not take audio; ask in text")
        chunks = [chunk for chunk in audio_chunks(audio, config.max_seconds) if not is_silent(chunk)]
        if not chunks:
            raise InputError(f"{audio_name(audio)} is silent (no sample reaches {SILENCE_DBFS:g} dBFS): nothing is "
                             "said in it; expected speech")
        return chunks

    def _speech_parts(self, chunks: list[torch.Tensor]) -> list[dict]:
        from encoders.audio import HOP

        return [{"type": "speech", "positions": n}
                for n in self.model.speech_positions([len(w) // HOP for w in chunks])] if chunks else []

    def _media(self, images: list[list], videos: list[list], max_images: int,
               chunks: list[list[torch.Tensor]] | None = None) -> Media | None:
        """Each question's images, videos and speech chunks (a list per question, maybe empty) as the model's media;
        None when there are none."""
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
        if chunks and any(chunks):
            from encoders.utterances import Utterances

            media.speech = Utterances.from_waves([w for question in chunks for w in question])
        return media if (media.images, media.videos, media.speech) != (None, None, None) else None

    def ask_stream(self, question: str | None = None, *, image=None, images: Sequence | None = None, video=None,
                   audio=None, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Stream the answer to `question` as text pieces.

        Args:
            question: the user's message (leading and trailing whitespace is dropped); may be None with `audio`.
            image: one image: a path, a PIL image or a uint8 array (H, W, 3); or `images`, a list of them (at most
                8), placed before the question in the user message, as Llama 3.2 Vision's chat format does.
            video: a video file's path (a model with a video adapter): its frames, sampled uniformly over the whole
                clip (`encoders.video`), placed before the question, after any images.
            audio: a spoken question or message (a model with a speech adapter): a file path, its bytes, or
                `(waveform, sample_rate)`; its embeddings enter the user message after any images and video, before
                `question`. Longer than the model's `speech_adapter.max_seconds`, it becomes several spans, one per
                chunk (`encoders.utterances`), never truncated; silent chunks are left out, and audio that is all
                silence is an InputError. No system prompt: the paper's spoken dialogue.
            system: a system prompt.
            max_new_tokens, temperature, top_k, top_p, seed: sampling (`generate.Sampling`); greedy by default.
        """
        prompt, images, videos, chunks = self._prompt(question, image, images, system, video, audio)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
        media = self._media([images], [videos], MAX_IMAGES, [chunks])
        return self.generator.stream_text(self.tokenizer, prompt, sampling, media=media)

    def ask(self, question: str | None = None, *, image=None, images: Sequence | None = None, video=None, audio=None,
            system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
            top_p: float = 1.0, seed: int | None = None) -> str:
        """The whole answer of `ask_stream` as one string."""
        return "".join(self.ask_stream(question, image=image, images=images, video=video, audio=audio, system=system,
                                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed))

    def ask_batch(self, questions: Sequence[str | None], *, images: Sequence | None = None,
                  videos: Sequence | None = None, audios: Sequence | None = None, system: str | None = None,
                  max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                  seed: int | None = None) -> list[str]:
        """Answer several questions in one batch: what `ask` answers for each, greedy, in a fraction of the time
        (`mm-llama eval` asks this way).

        Args:
            questions: the user messages (None where the question is spoken in `audios`).
            images: None, or one entry per question: an image (as `ask`'s `image`) or None.
            videos: None, or one entry per question: a video path (as `ask`'s `video`) or None.
            audios: None, or one entry per question: audio (as `ask`'s `audio`) or None.
            system, max_new_tokens, temperature, top_k, top_p, seed: as `ask`, for every question.
        Returns:
            the answers, in the order of `questions`.
        """
        if not isinstance(questions, list | tuple) or not questions:
            raise InputError(f"questions must be a non-empty list of str, got {questions!r:.80}")
        given = {"images": images, "videos": videos, "audios": audios}
        for name, entries in given.items():
            if entries is None:
                given[name] = [None] * len(questions)
            elif not isinstance(entries, list | tuple) or len(entries) != len(questions):
                raise InputError(f"{name} must be a list with one entry (one {name[:-1]} or None) per question: "
                                 f"{len(questions)} question(s), got {entries!r:.80}")
        requests = []
        for k, (q, image, video, audio) in enumerate(zip(questions, given["images"], given["videos"], given["audios"],
                                                         strict=True)):
            try:
                requests.append(self._prompt(q, image, None, system, video, audio))
            except InputError as e:  # which of the batch's questions it is, as well as what is wrong
                raise InputError(f"question {k}: {e}") from None
        media = self._media([r[1] for r in requests], [r[2] for r in requests], 1, [r[3] for r in requests])
        return self._generate([r[0] for r in requests], media, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def transcribe(self, audio, *, language: str = "English", max_new_tokens: int = 256, batch_size: int = 8
                   ) -> str:
        """What is said in `audio`, written in `language` (greedy): the paper's recognition task, the system
        prompt `Repeat after me in {language}:` and the speech alone in the user message.

        Args:
            audio: a file path, its bytes, or `(waveform, sample_rate)`. Longer than the model's
                `speech_adapter.max_seconds`, it is cut into chunks at pauses (`encoders.utterances`), read from the
                file one chunk at a time and transcribed `batch_size` chunks per batch: memory stays bounded
                whatever the length; the chunks' transcripts are joined by spaces. Silent chunks
                (`encoders.utterances.is_silent`) are skipped: silence transcribes as "".
            language: the language to write in (a name, e.g. "English").
            max_new_tokens: the longest transcript of one chunk, in tokens.
        """
        from encoders.utterances import Utterances, audio_chunks, is_silent

        if not isinstance(language, str) or not language.strip():
            raise InputError(f"language must be a non-empty str such as 'English', got {language!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        config = self.model.config.speech_adapter
        if config is None:
            raise InputError("this model has no speech encoder: it cannot transcribe audio; give a checkpoint with a "
                             "speech adapter (mm-llama recipe demo --out DIR --video-model demo trains one on the demo "
                             "model)")
        system = system_prompt("asr", language.strip())
        texts, group = [], []

        def flush() -> None:
            prompts = [self.tokenizer.encode_dialog([{"role": "system", "content": system},
                                                     {"role": "user", "content": self._speech_parts([w])}])
                       for w in group]
            media = Media(speech=Utterances.from_waves(group))
            texts.extend(t.strip() for t in self._generate(prompts, media, max_new_tokens=max_new_tokens))
            group.clear()

        for chunk in audio_chunks(audio, config.max_seconds):
            if is_silent(chunk):  # the model would make up a sentence for it
                continue
            group.append(chunk)
            if len(group) == batch_size:
                flush()
        if group:
            flush()
        return " ".join(t for t in texts if t)

    def _generate(self, prompts: list[list[int]], media: Media | None, *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, seed: int | None = None
                  ) -> list[str]:
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
        answers = self.generator.generate(prompts, sampling, self.tokenizer.stop_tokens, media)
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
