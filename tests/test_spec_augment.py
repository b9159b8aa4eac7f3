"""SpecAugment for the speech-adapter stage (`mm_llama.data.spec_augment`): masks drawn from (seed, data position,
rank) alone, within the configured sizes, never touching lengths or the padding."""

import pytest
import torch

from encoders.utterances import Utterances
from mm_llama.data.spec_augment import SpecAugmentConfig, spec_augment
from mm_llama.errors import ConfigError


@pytest.fixture(scope="module")
def utterances():
    g = torch.Generator().manual_seed(0)
    return Utterances.from_waves([0.1 * torch.randn(16_000 * 2, generator=g), 0.1 * torch.randn(48_000, generator=g)])


def test_the_same_position_draws_the_same_masks_and_another_position_or_rank_others(utterances):
    config = SpecAugmentConfig()
    first = spec_augment(utterances, config, 5)
    torch.manual_seed(123)  # the global generator's state does not matter, and is left as it was
    state = torch.get_rng_state()
    assert torch.equal(spec_augment(utterances, config, 5).mel, first.mel)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(spec_augment(utterances, config, 6).mel, first.mel)
    assert not torch.equal(spec_augment(utterances, config, 5, rank=1).mel, first.mel)
    assert not torch.equal(spec_augment(utterances, SpecAugmentConfig(seed=1), 5).mel, first.mel)


def test_masks_are_zero_bands_and_spans_within_the_configured_sizes(utterances):
    config = SpecAugmentConfig(time_masks=3, time_mask_frames=10, freq_masks=2, freq_mask_bins=12)
    for index in range(20):
        out = spec_augment(utterances, config, index)
        assert out.host_lengths == utterances.host_lengths and torch.equal(out.lengths, utterances.lengths)
        changed = out.mel != utterances.mel
        assert torch.all(out.mel[changed] == 0)  # masked to the normalised features' mean
        for k, n in enumerate(utterances.host_lengths):
            assert not changed[k, n:].any()  # the padding stays zero
            zero = out.mel[k, :n] == 0
            frames, bins = zero.all(1).sum().item(), zero.all(0).sum().item()
            assert frames <= 3 * 10 and bins <= 2 * 12, (index, k, frames, bins)
            # what is masked is whole frames or whole bins
            assert torch.equal(changed[k, :n], changed[k, :n] & (zero.all(1, keepdim=True) | zero.all(0, keepdim=True)))
    # Over many draws, masks land: about 0-30 frames and 0-24 bins per utterance.
    total = sum((spec_augment(utterances, config, i).mel[0, :200] == 0).all(1).sum().item() for i in range(20))
    assert 20 <= total <= 20 * 30


def test_no_masks_change_nothing_and_bad_settings_are_refused(utterances):
    none = SpecAugmentConfig(time_masks=0, freq_masks=0)
    assert torch.equal(spec_augment(utterances, none, 0).mel, utterances.mel)
    with pytest.raises(ConfigError, match="time_masks must be an integer >= 0"):
        SpecAugmentConfig(time_masks=-1)
    with pytest.raises(ConfigError, match=r"max_time_fraction must be in \(0, 1\]"):
        SpecAugmentConfig(max_time_fraction=1.5)
