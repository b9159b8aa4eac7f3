"""Hugging Face Mllama's text side <-> `MMLlama`'s names (data: key tables plus the rotary permutation).

HF keeps self- and cross-attention layers in one list (40 for 11B): the cross block that precedes trunk layer
`schedule[j]` sits at HF index `schedule[j] + j`, and trunk layer i at `i + (blocks at or before i)`. Its
`embed_tokens` is the frozen table and the 8 media rows stacked (128264 rows for 11B).
"""

from __future__ import annotations

import re

import torch

from mm_llama.checkpoints.hf import permute_rope, unpermute_rope
from mm_llama.errors import CheckpointError
from mm_llama.llama import LlamaConfig

SELF_LAYER = {  # HF suffix under layers.X. -> ours under trunk.layers.i.
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
CROSS_LAYER = {  # HF suffix under layers.X. -> ours under image_adapter.cross_attention_layers.j.
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "cross_attn_attn_gate": "gate_attn",
    "cross_attn_mlp_gate": "gate_ffwd",
}


def hf_layer_index(schedule: list[int], n_layers: int) -> tuple[dict[int, int], dict[int, int]]:
    """(trunk layer -> HF index, cross block -> HF index)."""
    blocks = {schedule[j] + j: j for j in range(len(schedule))}
    trunk = {i: i + sum(1 for s in schedule if s <= i) for i in range(n_layers)}
    return {i: x for i, x in trunk.items()}, {j: x for x, j in blocks.items()}


def text_state_from_hf(hf: dict[str, torch.Tensor], config: LlamaConfig, schedule: list[int],
                       prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """HF Mllama text weights (keys under `prefix`, e.g. "model." for MllamaForCausalLM, "model.language_model." at
    runtime in MllamaForConditionalGeneration) -> MMLlama's `trunk.*`, `media.*`, `image_adapter.*` keys."""
    trunk_at, block_at = hf_layer_index(schedule, config.n_layers)
    of_hf = {x: ("trunk.layers", i, SELF_LAYER) for i, x in trunk_at.items()}
    of_hf |= {x: ("image_adapter.cross_attention_layers", j, CROSS_LAYER) for j, x in block_at.items()}
    out: dict[str, torch.Tensor] = {}
    layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)$")
    for key, value in hf.items():
        if m := layer_re.match(key):
            x, suffix = int(m.group(1)), m.group(2)
            if x not in of_hf or suffix not in of_hf[x][2]:
                raise CheckpointError(f"unexpected Mllama tensor {key!r}")
            base, index, table = of_hf[x]
            if table is SELF_LAYER and suffix.endswith("q_proj.weight"):
                value = unpermute_rope(value, config.n_heads)
            elif table is SELF_LAYER and suffix.endswith("k_proj.weight"):
                value = unpermute_rope(value, config.n_kv_heads)
            out[f"{base}.{index}.{table[suffix]}"] = value
        elif key == f"{prefix}embed_tokens.weight":
            out["trunk.tok_embeddings.weight"] = value[: config.vocab_size]
            out["media.learnable_embedding.weight"] = value[config.vocab_size:]
        elif key == f"{prefix}norm.weight":
            out["trunk.norm.weight"] = value
        elif key == head:
            out["trunk.output.weight"] = value
        else:
            raise CheckpointError(f"unexpected Mllama tensor {key!r}")
    return out


def text_state_to_hf(state: dict[str, torch.Tensor], config: LlamaConfig, schedule: list[int],
                     prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """The inverse of `text_state_from_hf`."""
    trunk_at, block_at = hf_layer_index(schedule, config.n_layers)
    to_hf = {"trunk.layers": (trunk_at, {v: k for k, v in SELF_LAYER.items()}),
             "image_adapter.cross_attention_layers": (block_at, {v: k for k, v in CROSS_LAYER.items()})}
    out = {f"{prefix}embed_tokens.weight": torch.cat([state["trunk.tok_embeddings.weight"],
                                                      state["media.learnable_embedding.weight"]]),
           f"{prefix}norm.weight": state["trunk.norm.weight"], head: state["trunk.output.weight"]}
    layer_re = re.compile(r"^(trunk\.layers|image_adapter\.cross_attention_layers)\.(\d+)\.(.+)$")
    for key, value in state.items():
        if not (m := layer_re.match(key)):
            continue
        at, table = to_hf[m.group(1)]
        suffix = table[m.group(3)]
        if m.group(1) == "trunk.layers" and suffix.endswith("q_proj.weight"):
            value = permute_rope(value, config.n_heads)
        elif m.group(1) == "trunk.layers" and suffix.endswith("k_proj.weight"):
            value = permute_rope(value, config.n_kv_heads)
        out[f"{prefix}layers.{at[int(m.group(2))]}.{suffix}"] = value
    return out


def mmllama_state_from_hf(hf: dict[str, torch.Tensor], config: LlamaConfig, vision_config, schedule: list[int]
                          ) -> dict[str, torch.Tensor]:
    """A whole `MllamaForConditionalGeneration` state dict (runtime names, transformers >= 4.52) -> MMLlama's."""
    from encoders.vision_hf import vision_state_from_hf

    vision = vision_state_from_hf(hf, vision_config, prefix="model.vision_model.")
    out = {f"vision.{k}": v for k, v in vision.items()}
    out["vision_projection.weight"] = hf["model.multi_modal_projector.weight"]
    out["vision_projection.bias"] = hf["model.multi_modal_projector.bias"]
    text = {k: v for k, v in hf.items() if k.startswith("model.language_model.") or k == "lm_head.weight"}
    out |= text_state_from_hf(text, config, schedule, prefix="model.language_model.")
    known = set(text) | {k for k in hf if k.startswith(("model.vision_model.", "model.multi_modal_projector."))}
    if unknown := sorted(set(hf) - known):
        raise CheckpointError(f"unexpected Mllama tensors {unknown[:5]}")
    return out
