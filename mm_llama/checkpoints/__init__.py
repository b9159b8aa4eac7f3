"""Reading and writing checkpoints. Llama 3 trunks (`Llama`): Meta's format (`meta.py`), Hugging Face's (`hf.py`) and
ours (`ours.py`: what the training stages write). Composed models (`MMLlama`, text-only or with parts) in all three
formats: `composed.py` (`load_mmllama`, `save_mmllama`, `convert_checkpoint`), with Llama 3.2 Vision's Meta and HF
layouts in `mllama_meta.py` and `mllama_hf.py`.

Every loader builds the model on the meta device and fills it with `load_state_dict(strict=True, assign=True)` from
memory-mapped tensors, so nothing is copied twice and a missing or extra tensor is an error naming the file.
"""

from mm_llama.checkpoints.composed import (
    convert_checkpoint,
    export_checkpoint,
    load_mmllama,
    read_composed,
    save_mmllama,
)
from mm_llama.checkpoints.fingerprint import trunk_fingerprint
from mm_llama.checkpoints.hf import meta_to_hf_state, permute_rope, unpermute_rope, write_hf
from mm_llama.checkpoints.meta import merge_meta_shards, split_meta_shards
from mm_llama.checkpoints.trunk import (
    assign_state,
    atomic_directory,
    check_state_dict,
    check_tokenizer_vocab,
    detect_format,
    load_llama,
    read_checkpoint,
    read_referenced_trunk,
    save_llama,
    tokenizer_candidates,
    write_trunk,
)

__all__ = ["assign_state", "atomic_directory", "check_state_dict", "check_tokenizer_vocab", "convert_checkpoint",
           "detect_format", "export_checkpoint", "load_llama", "load_mmllama", "merge_meta_shards", "meta_to_hf_state",
           "permute_rope", "read_checkpoint", "read_composed", "read_referenced_trunk", "save_llama", "save_mmllama",
           "split_meta_shards", "tokenizer_candidates", "trunk_fingerprint", "unpermute_rope", "write_hf",
           "write_trunk"]
