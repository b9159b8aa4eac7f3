"""mm-llama: a frozen Llama 3 trunk extended compositionally with vision, video, speech and a voice."""

from mm_llama.errors import MMLlamaError
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.model import MMLlama
from mm_llama.tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "MMLlama", "MMLlamaError", "Tokenizer"]
__version__ = "0.1.0"
