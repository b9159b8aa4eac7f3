"""mm-llama: a frozen Llama 3 trunk extended compositionally with vision, video, speech and a voice."""

from mm_llama.errors import MMLlamaError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.tokenizer import Tokenizer

__all__ = ["Assistant", "Llama", "LlamaConfig", "MMLlama", "MMLlamaError", "Tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # MMLlama and Assistant import encoders/ and adapters/, which import mm_llama.errors (and so run this file):
    # loading them lazily keeps `import adapters.cross_attention` (or encoders) as a first import free of a cycle.
    if name == "MMLlama":
        from mm_llama.model import MMLlama

        return MMLlama
    if name == "Assistant":
        from mm_llama.api import Assistant

        return Assistant
    raise AttributeError(f"module 'mm_llama' has no attribute {name!r}")
