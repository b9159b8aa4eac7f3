"""The conformer speech encoder (paper §8.2.1): its size at the paper's preset, padding invariance, length
arithmetic."""

import pytest
import torch

from encoders.speech import SpeechEncoder, SpeechEncoderConfig, encoder_lengths
from mm_llama.errors import ConfigError


def test_paper_preset_has_the_papers_one_billion_parameters():
    config = SpeechEncoderConfig.preset("paper")
    with torch.device("meta"):
        encoder = SpeechEncoder(config)
    per_layer = sum(p.numel() for p in encoder.layers[0].parameters())
    total = sum(p.numel() for p in encoder.parameters())
    # torchaudio's ConformerLayer at d 1536, FFN 4096, kernel 7 has 41,733,632 (research/speech.md §1.3); ours has its
    # layout with LayerNorm in place of BatchNorm (the same 2 x 1536 parameters).
    assert per_layer == 41_733_632
    assert total == 24 * per_layer + (4 * 80 * 1536 + 1536) == 1_002_100_224  # "about 1B"
    assert (config.n_layers, config.dim, config.n_heads, config.ffn_dim, config.conv_kernel) == (24, 1536, 24, 4096, 7)


def _encoder(seed: int = 0) -> SpeechEncoder:
    torch.manual_seed(seed)
    return SpeechEncoder(SpeechEncoderConfig.preset("debug")).eval()


def test_an_utterance_encodes_the_same_alone_and_batched_with_a_longer_one():
    encoder = _encoder()
    torch.manual_seed(1)
    short, long = torch.randn(37, 80), 3 * torch.randn(101, 80)
    batch = torch.zeros(2, 101, 80)
    batch[0, :37], batch[1] = short, long
    batch[0, 37:] = 100.0  # whatever sits in the padding must not reach the utterance
    with torch.no_grad():
        alone, alone_len = encoder(short[None], torch.tensor([37]))
        both, both_len = encoder(batch, torch.tensor([37, 101]))
        long_alone, _ = encoder(long[None], torch.tensor([101]))
    assert alone_len.tolist() == [10] and both_len.tolist() == [10, 26] and both.shape == (2, 26, 64)
    assert (alone[0] - both[0, :10]).abs().max() <= 1e-5
    assert (long_alone[0] - both[1]).abs().max() <= 1e-5
    # The encoder is not the identity on the padding question: the utterance's frames do depend on each other.
    with torch.no_grad():
        changed, _ = encoder(torch.cat([short[:36], -short[36:]])[None], torch.tensor([37]))
    assert (changed[0, 0] - alone[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("n_frames", [1, 3, 4, 5, 37, 100, 6000])
def test_lengths_are_a_quarter_rounded_up(n_frames):
    assert encoder_lengths(torch.tensor([n_frames])).item() == -(-n_frames // 4)
    if n_frames <= 100:
        with torch.no_grad():
            out, lengths = _encoder()(torch.randn(1, n_frames, 80), torch.tensor([n_frames]))
        assert out.shape == (1, -(-n_frames // 4), 64) and lengths.tolist() == [-(-n_frames // 4)]
    assert encoder_lengths(torch.tensor([6000])).item() == 1500  # 60 s of 10 ms frames: 1,500 frames of 40 ms


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="unknown speech encoder preset 'huge'"):
        SpeechEncoderConfig.preset("huge")
    with pytest.raises(ConfigError, match="must split into n_heads"):
        SpeechEncoderConfig.preset("debug", n_heads=5)
    with pytest.raises(ConfigError, match="conv_kernel must be odd"):
        SpeechEncoderConfig.preset("debug", conv_kernel=4)
    with pytest.raises(ConfigError, match="unknown speech encoder key"):
        SpeechEncoderConfig.preset("debug", width=3)
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"expects \(B, T, 80\) mel frames, got \(1, 10, 40\)"):
        encoder(torch.zeros(1, 10, 40), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"lengths must be \(B,\) in 1..10, got \[0\]"):
        encoder(torch.zeros(1, 10, 80), torch.tensor([0]))
