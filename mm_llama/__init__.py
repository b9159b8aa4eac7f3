"""mm-llama: a frozen Llama 3 trunk extended compositionally with vision, video, speech and a voice."""

from mm_llama.errors import MMLlamaError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "MMLlama", "MMLlamaError", "Tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # MMLlama imports encoders/ and adapters/, which import mm_llama.errors: loading it lazily keeps
    # `import adapters.cross_attention` (or encoders) as a first import free of a cycle.
    if name == "MMLlama":
        from mm_llama.model import MMLlama

        return MMLlama
    raise AttributeError(f"module 'mm_llama' has no attribute {name!r}")
