"""The speech adapter (paper §8.2.1): its size for the 8B and 70B trunks, its length arithmetic, and padding
invariance of encoder + adapter."""

import pytest
import torch

from adapters.speech import SpeechAdapter, SpeechAdapterConfig, adapter_lengths
from encoders.speech import SpeechEncoder, SpeechEncoderConfig, encoder_lengths
from mm_llama.errors import ConfigError


@pytest.mark.parametrize(("trunk_dim", "expected"), [(4096, 102_267_904), (8192, 114_854_912)])
def test_the_paper_adapter_has_about_100m_parameters(trunk_dim, expected):
    with torch.device("meta"):
        adapter = SpeechAdapter(SpeechAdapterConfig(), trunk_dim)
    # conv 1536 -> 3072 (k 3) 14.16M, attention 37.77M, SwiGLU 4096 37.75M, output 3072 -> D, norms
    assert sum(p.numel() for p in adapter.parameters()) == expected


def test_positions_are_half_the_encoder_frames_rounded_up_and_a_minute_is_750():
    config = SpeechAdapterConfig()
    frames = torch.arange(1, 200)
    assert torch.equal(adapter_lengths(frames, config), (frames + 1) // 2)
    samples = 60 * 16_000
    mel_frames = torch.tensor([samples // 160])  # encoders.audio: one 10 ms frame per hop
    assert adapter_lengths(encoder_lengths(mel_frames), config).item() == 750  # §8.2.1: 60 s = 750 positions
    adapter = SpeechAdapter(SpeechAdapterConfig(in_dim=64, dim=64, n_heads=4, ffn_dim=96), trunk_dim=48)
    for n in (1, 2, 7, 8):
        with torch.no_grad():
            out, lengths = adapter(torch.randn(1, n, 64), torch.tensor([n]))
        assert out.shape == (1, (n + 1) // 2, 48) and lengths.tolist() == [(n + 1) // 2]


def test_encoder_and_adapter_give_an_utterance_the_same_embeddings_alone_and_in_a_batch_of_four():
    torch.manual_seed(0)
    encoder = SpeechEncoder(SpeechEncoderConfig.preset("debug")).eval()
    adapter = SpeechAdapter(SpeechAdapterConfig(in_dim=64, dim=64, n_heads=4, ffn_dim=96), trunk_dim=48).eval()
    lengths = torch.tensor([37, 120, 5, 81])
    mel = torch.randn(4, 120, 80) * torch.tensor([1.0, 3.0, 0.5, 2.0])[:, None, None]
    for i, n in enumerate(lengths.tolist()):
        mel[i, n:] = 50.0  # garbage in the padding must not reach any utterance

    def embed(m, n):
        with torch.no_grad():
            return adapter(*encoder(m, n))

    batched, batched_lengths = embed(mel, lengths)
    assert batched_lengths.tolist() == [5, 15, 1, 11]
    for i, n in enumerate(lengths.tolist()):
        alone, alone_lengths = embed(mel[i : i + 1, :n], lengths[i : i + 1])
        p = alone_lengths.item()
        assert p == batched_lengths[i] and (alone[0] - batched[i, :p]).abs().max() <= 1e-5


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="must split into n_heads"):
        SpeechAdapterConfig(n_heads=7)
    with pytest.raises(ConfigError, match="conv_kernel must be odd"):
        SpeechAdapterConfig(conv_kernel=2)
    with pytest.raises(ConfigError, match="conv_stride must be a positive integer"):
        SpeechAdapterConfig(conv_stride=0)
