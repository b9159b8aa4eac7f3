"""The trunk: parity with transformers' LlamaForCausalLM, presets, hidden states, config errors."""

import pytest
import torch

from conftest import make_hf_checkpoint
from mm_llama.checkpoints import load_llama
from mm_llama.errors import ConfigError
from mm_llama.llama import LLAMA_PRESETS, Llama, LlamaConfig, rope_frequencies

PARITY_CASES = {
    "gqa-scaled-untied": dict(n_heads=4, n_kv_heads=2, scaled_rope=True, tied=False),
    "gqa-scaled-tied": dict(n_heads=4, n_kv_heads=2, scaled_rope=True, tied=True),
    "mha-plain-rope": dict(n_heads=4, n_kv_heads=4, scaled_rope=False, tied=False),
    "mqa-scaled-tied": dict(n_heads=8, n_kv_heads=1, scaled_rope=True, tied=True),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_match_transformers(tmp_path, case):
    hf = make_hf_checkpoint(tmp_path, seed=1, **PARITY_CASES[case])
    ours = load_llama(tmp_path, dtype=torch.float32)
    assert ours.config.tie_embeddings == PARITY_CASES[case]["tied"]
    # 300 positions: beyond the 32-token "original context", so every RoPE scaling band is exercised.
    tokens = torch.randint(0, 300, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.dtype == torch.float32 and got.shape == (2, 300, 300)
    assert expected.abs().max() > 1.0  # logits with real spread, so the tolerance means something
    assert (got - expected).abs().max().item() <= 1e-4


def test_taps_match_transformers_hidden_states(hf_checkpoint):
    from mm_llama.errors import InputError
    from mm_llama.model import MMLlama

    path, hf = hf_checkpoint
    ours = MMLlama.from_pretrained(path, dtype=torch.float32)  # the composed model owns the loop with taps
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True).hidden_states
        got = ours.step(tokens, taps=[0, 1])
    # HF's list: [embeddings, after block 1, final norm applied to the last]; ours: after 0 and 1 blocks.
    assert (got.taps[0] - expected[0]).abs().max() == 0
    assert expected[1].abs().max() > 1.0 and (got.taps[1] - expected[1]).abs().max() <= 1e-5
    assert torch.equal(got.logits, ours(tokens))  # the same pass, whatever is tapped
    with pytest.raises(InputError, match="0..2"):
        ours.step(tokens, taps=[3])


def test_embeddings_input_equals_token_input():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("debug")).eval()
    model.init_weights()
    tokens = torch.randint(0, 768, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(tokens), model(embeddings=model.embed(tokens)))
        last = model(tokens, last_only=True)
    assert last.shape == (2, 1, 768)
    assert torch.allclose(last[:, 0], model(tokens)[:, -1], atol=1e-6)


# Parameter counts of Meta's releases (HF safetensors total_size / 2 bytes per bf16 parameter).
RELEASE_PARAMS = {"1B": 1_235_814_400, "3B": 3_212_749_824, "8B": 8_030_261_248, "70B": 70_553_706_496,
                  "405B": 405_853_388_800}
RELEASE_FFN = {"1B": 8192, "3B": 8192, "8B": 14336, "70B": 28672, "405B": 53248}


@pytest.mark.parametrize("name", RELEASE_PARAMS)
def test_presets_have_release_sizes(name):
    config = LlamaConfig.preset(name)
    assert config.ffn_hidden_dim == RELEASE_FFN[name]
    with torch.device("meta"):
        model = Llama(config)
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied head counts once
    assert sum(unique.values()) == RELEASE_PARAMS[name]


def test_rope_scaling_bands():
    config = LlamaConfig.preset("8B")
    plain = rope_frequencies(LlamaConfig.preset("8B", use_scaled_rope=False))
    scaled = rope_frequencies(config)
    wavelen = 2 * torch.pi / plain
    high = wavelen < 8192 / 4  # short wavelengths are kept
    low = wavelen > 8192  # long ones are divided by the factor
    assert torch.equal(scaled[high], plain[high])
    assert torch.allclose(scaled[low], plain[low] / 8)
    band = ~high & ~low
    assert band.any() and ((scaled[band] < plain[band]) & (scaled[band] > plain[band] / 8)).all()


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"unknown LlamaConfig key\(s\) \['dimm'\]"):
        LlamaConfig.from_dict({"dimm": 4}, source="x.json")
    with pytest.raises(ConfigError, match="not divisible by n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="n_layers must be a positive integer"):
        LlamaConfig(n_layers=0)
    with pytest.raises(ConfigError, match="unknown Llama preset 'huge'"):
        LlamaConfig.preset("huge")
    assert set(LLAMA_PRESETS) >= {"debug", "1B", "3B", "8B", "70B", "405B"}
