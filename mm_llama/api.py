"""Question answering: `ask` and `ask_stream` (also available as `MMLlama.ask` / `MMLlama.ask_stream`).

Inputs are checked before any work: an image that cannot be read, more images than the model accepts, a prompt
longer than the context each raise an `MMLlamaError` naming the input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mm_llama.errors import InputError
from mm_llama.generate import Generator, Sampling


def _generator(model) -> Generator:
    """One Generator per model, so KV caches (and compiled graphs) are reused across questions."""
    if getattr(model, "_api_generator", None) is None:
        model._api_generator = Generator(model)
    return model._api_generator


def _vision_inputs(model, images: Sequence) -> object | None:
    if not images:
        return None
    if model.vision is None:
        raise InputError("this model has no image encoder: ask without an image")
    batch = model.preprocess([list(images)])
    return _generator(model).encode_images(batch["pixel_values"], batch["aspect_ratio_ids"], batch["n_images"])


def ask_stream(model, question: str, *, image=None, images: Sequence | None = None, system: str | None = None,
               max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
    """Stream the answer to `question` about `image` (a path, PIL image or uint8 array (H, W, 3)) or `images`.

    The images are placed before the question in the user message, in Llama 3.2's chat format; greedy by default.
    """
    if model.tokenizer is None:
        raise InputError("the model has no tokenizer: set model.tokenizer = Tokenizer.from_file(...)")
    if image is not None and images is not None:
        raise InputError("pass image=... or images=[...], not both")
    images = [image] if image is not None else list(images or [])
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question, "media": ["<|image|>"] * len(images)})
    prompt = model.tokenizer.encode_dialog(messages)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    vision = _vision_inputs(model, images)
    yield from _generator(model).stream_text(model.tokenizer, prompt, sampling, vision=vision)


def ask(model, question: str, **kwargs) -> str:
    """The whole answer of `ask_stream` as one string."""
    return "".join(ask_stream(model, question, **kwargs))
