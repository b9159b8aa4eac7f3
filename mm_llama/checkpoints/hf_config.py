"""Hugging Face `config.json` (model_type "llama") <-> `LlamaConfig`.

transformers < 5 writes `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters` (theta inside). Both are
read. The FFN size is stored by HF as `intermediate_size`; we store Meta's `multiple_of`/`ffn_dim_multiplier`, so
`ffn_params_for` finds the pair that reproduces it.
"""

from __future__ import annotations

import torch

from mm_llama.errors import ConfigError
from mm_llama.llama import LlamaConfig, ffn_hidden_dim

# Keys with no effect on the computation (generation-config token ids, training-only settings, bookkeeping).
_IGNORED = {"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
            "transformers_version", "model_type", "initializer_range", "use_cache", "attention_dropout",
            "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "tie_encoder_decoder",
            "is_encoder_decoder"}
# Keys that must hold the value Llama 3 uses; anything else is an architecture we do not implement.
_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
_USED = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
         "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
         "max_position_embeddings", "tie_word_embeddings", "head_dim"}

# (multiple_of, ffn_dim_multiplier) pairs of Meta's releases, tried first so converted params.json look like Meta's.
_KNOWN_FFN = [(1024, 1.3), (4096, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0), (256, None), (4096, None)]


def ffn_params_for(dim: int, hidden: int) -> tuple[int, float | None]:
    """A (multiple_of, ffn_dim_multiplier) pair for which Meta's FFN rule gives `hidden` at model width `dim`."""
    for multiple_of, multiplier in _KNOWN_FFN:
        if ffn_hidden_dim(dim, multiple_of, multiplier) == hidden:
            return multiple_of, multiplier
    base = int(2 * 4 * dim / 3)
    multiplier = hidden / base
    # Nudge up by ulps until int(multiplier * base) == hidden (float rounding can land one below).
    for _ in range(8):
        if int(multiplier * base) == hidden:
            return 1, multiplier
        multiplier = float(torch.nextafter(torch.tensor(multiplier, dtype=torch.float64),
                                           torch.tensor(2.0 * multiplier, dtype=torch.float64)))
    raise ConfigError(f"cannot express FFN size {hidden} at dim {dim} with Meta's multiple_of/ffn_dim_multiplier")


def hf_config_to_llama(cfg: dict, *, source: str) -> LlamaConfig:
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not 'llama'"
                          " (for Llama 3.2 Vision, 'mllama', use MMLlama.from_pretrained)")
    unknown = sorted(set(cfg) - _IGNORED - _USED - set(_REQUIRED))
    if unknown:
        known = sorted(_IGNORED | _USED | set(_REQUIRED))
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {known}")
    for key, value in _REQUIRED.items():
        if key in cfg and cfg[key] != value:
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported (Llama 3 uses {value!r})")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ConfigError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads "
                          f"({dim // n_heads}); Llama 3 derives it")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; accepted: 'default', 'llama3'")
    multiple_of, multiplier = ffn_params_for(dim, cfg["intermediate_size"])
    values = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=cfg.get("num_key_value_heads", n_heads), vocab_size=cfg["vocab_size"],
                  multiple_of=multiple_of, ffn_dim_multiplier=multiplier, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                  rope_theta=float(rope_theta), use_scaled_rope=rope_type == "llama3",
                  max_seq_len=cfg.get("max_position_embeddings", 8192),
                  tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if rope_type == "llama3":
        known_rope = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        extra = sorted(set(rope) - known_rope)
        if extra:
            raise ConfigError(f"{source}: unknown llama3 rope key(s) {extra}")
        values.update(rope_scaling_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_context=int(rope["original_max_position_embeddings"]))
    return LlamaConfig.from_dict(values, source=source)


def llama_to_hf_config(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """The config.json transformers needs to load our weights as a LlamaForCausalLM (transformers 4.x and 5.x)."""
    rope_scaling = None
    if config.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": config.rope_scaling_factor,
                        "low_freq_factor": config.rope_low_freq_factor,
                        "high_freq_factor": config.rope_high_freq_factor,
                        "original_max_position_embeddings": config.rope_original_context}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.ffn_hidden_dim, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
