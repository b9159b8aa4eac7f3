"""The Llama 3.2 11B-Vision layout with random weights, ours and transformers', for the vision benchmarks.

Both benchmarks run from the repository root (`python benchmarks/vision_*.py`): Python puts this folder on the path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adapters.cross_attention import CrossAttentionConfig
from adapters.video import VideoAdapterConfig
from encoders.vision import VisionConfig
from mm_llama.checkpoints.mllama_hf import hf_mllama_config, hub_to_runtime, mmllama_state_to_hf
from mm_llama.llama import LlamaConfig
from mm_llama.model import MMConfig, MMLlama


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_random(device: torch.device, gpu: bool, *, hf_semantics: bool = False,
                 video: VideoAdapterConfig | None = None) -> MMLlama:
    """fp32, seeded: the 11B-Vision layout on a GPU, the debug sizes on the CPU; every gate at 0.5 so the adapter and
    the global ViT layers really run. `hf_semantics`: transformers' reading (intermediate features after block i,
    attention branch not row-masked), for comparisons where the numbers must agree. `video`: a video adapter too
    (its gates at 0.5 as well; transformers has no video path)."""
    trunk = LlamaConfig.preset("8B" if gpu else "debug", max_seq_len=4096, use_scaled_rope=True)
    vision = VisionConfig.preset("3.2-11B" if gpu else "debug",
                                 intermediate_mode="output" if hf_semantics else "input")
    adapter = CrossAttentionConfig(n_layers=8 if gpu else 1, mask_attention_rows=not hf_semantics)  # (HF's padding
    # images only matter with padding image slots, which these benchmarks do not have)
    torch.manual_seed(0)
    with torch.device(device):
        model = MMLlama(MMConfig(trunk=trunk, vision=vision, image_adapter=adapter, video_adapter=video))
    model.trunk.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
            elif not name.startswith("trunk.") and p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
    return model


def to_transformers(model: MMLlama, device: torch.device, dtype_of: Callable[[str], torch.dtype]):
    """transformers' MllamaForConditionalGeneration with our weights, through the library's own conversion
    (config.json and tensor names); `dtype_of(runtime_name)` gives each tensor's dtype."""
    import transformers
    from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

    config = transformers.MllamaConfig.from_dict(hf_mllama_config(model.config, torch.float32))
    with torch.device("meta"):
        hf = transformers.MllamaForConditionalGeneration(config)
    state = {hub_to_runtime(k): x for k, x in mmllama_state_to_hf(model.state_dict(), model.config).items()}
    hf.load_state_dict({k: x.to(device, dtype_of(k)) for k, x in state.items()}, strict=True, assign=True)
    # The rotary buffer is not in the state dict: build it for real on the weights' device.
    hf.model.language_model.rotary_emb = MllamaRotaryEmbedding(config.text_config).to(device)
    return hf
