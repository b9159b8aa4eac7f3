"""BEST-RQ's frozen quantizer and span masks (paper §8.3.1): seeded, saved with the model, never trained; masks of
the defined density."""

import pytest
import torch

from encoders.best_rq import BestRQConfig, RandomProjectionQuantizer, mask_frames, span_mask, target_frames
from mm_llama.errors import ConfigError


def _stacked(seed: int, B: int = 2, S: int = 500) -> torch.Tensor:
    return torch.randn(B, S, 320, generator=torch.Generator().manual_seed(seed))


def test_targets_are_fixed_by_the_seed_and_survive_save_and_load(tmp_path):
    x = _stacked(0)
    a, b = RandomProjectionQuantizer(BestRQConfig(seed=3)), RandomProjectionQuantizer(BestRQConfig(seed=3))
    codes = a(x)
    assert codes.shape == (2, 500, 16) and codes.dtype == torch.long and 0 <= int(codes.min()) < int(codes.max()) < 8192
    assert torch.equal(codes, b(x))
    other = RandomProjectionQuantizer(BestRQConfig(seed=4))
    assert (other(x) != codes).float().mean() > 0.9
    torch.save(a.state_dict(), tmp_path / "q.pt")
    assert set(a.state_dict()) == {"projection", "codebooks"}  # saved with the checkpoint
    other.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert torch.equal(other(x), codes)
    # The 16 codebooks are independent: they disagree with each other, and each spreads over its codes.
    assert (codes[..., 0] != codes[..., 1]).float().mean() > 0.9
    assert min(len(codes[..., k].unique()) for k in range(16)) > 400  # of 1,000 frames


def test_the_quantizer_has_nothing_to_train():
    quantizer = RandomProjectionQuantizer(BestRQConfig(codebook_size=64))
    assert list(quantizer.parameters()) == []
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    head = torch.nn.Linear(320, 16 * 64)
    model = torch.nn.ModuleDict({"quantizer": quantizer, "head": head})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _stacked(1, S=50)
    codes = quantizer(x)
    assert not codes.requires_grad
    loss = torch.nn.functional.cross_entropy(head(x).view(2, 50, 16, 64).flatten(0, 2), codes.flatten())
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in quantizer.state_dict().items())
    # Unit-norm codes (cosine matching) and Xavier-uniform bounds on the projection.
    assert torch.allclose(quantizer.codebooks.norm(dim=-1), torch.ones(16, 64), atol=1e-5)
    assert float(quantizer.projection.abs().max()) <= (6 / (320 + 16)) ** 0.5


def test_realised_mask_fraction_matches_the_definition():
    config = BestRQConfig()
    assert config.expected_mask_fraction() == pytest.approx(1 - 0.975**32)  # 55.5 %
    lengths = torch.tensor([6000] * 16 + [100] * 16)
    mask = span_mask(lengths, 6000, config, torch.Generator().manual_seed(0))
    long = mask[:16].float().mean().item()
    assert abs(long - 0.5545) < 0.01  # away from the start, 1 - 0.975^32; the first 31 frames are a little less
    assert not mask[16:, 100:].any()  # padding is never masked
    # Every covered run is a union of 32-frame spans (cut only at the utterance's end): no run shorter than 32
    # unless it touches the end of the utterance.
    row = mask[0].int()
    edges = torch.diff(torch.cat([torch.tensor([0]), row, torch.tensor([0])]))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    runs = list(zip(starts.tolist(), ends.tolist(), strict=True))
    assert len(runs) > 50 and all((e - s >= 32) or e == 6000 for s, e in runs)
    # The same generator state gives the same mask; another seed another.
    assert torch.equal(mask, span_mask(lengths, 6000, config, torch.Generator().manual_seed(0)))
    assert not torch.equal(mask, span_mask(lengths, 6000, config, torch.Generator().manual_seed(1)))


def test_masked_frames_become_noise_and_targets_need_a_whole_masked_group():
    mel = torch.randn(1, 10, 80) * 5
    mask = torch.tensor([[False, True, True, True, True, True, False, False, True, True]])
    out = mask_frames(mel, mask, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out[0, ~mask[0]], mel[0, ~mask[0]])
    assert out[0, mask[0]].std() < 0.2 and (out[0, mask[0]] - mel[0, mask[0]]).abs().mean() > 1
    # Groups of 4: [F T T T] [T T F F] [T T + padding]: only a group masked throughout is a target.
    assert target_frames(mask, 4).tolist() == [[False, False, False]]
    assert target_frames(torch.ones(1, 8, dtype=torch.bool), 4).tolist() == [[True, True]]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="mask_prob must be in"):
        BestRQConfig(mask_prob=1.5)
    with pytest.raises(ConfigError, match="codebook_size must be a positive integer"):
        BestRQConfig(codebook_size=0)
