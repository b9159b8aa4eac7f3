"""BEST-RQ targets and masks for `speech-pretrain` (Llama 3 paper §8.3.1; Chiu et al. 2022; Google USM's
multi-softmax): the speech encoder predicts, at masked frames, which code of each of 16 frozen random codebooks the
stacked input frames fall nearest to.

- Targets: each encoder frame's 4 stacked, normalised mel frames (320-d) are projected by a frozen random matrix to
  16-d and matched by cosine to the nearest of 8,192 frozen random codes, in 16 independent codebooks. The projection
  (Xavier-uniform) and the codebooks (standard normal, unit-normed) are seeded buffers: saved with the checkpoint,
  never parameters, so no optimizer sees them.
- Masks: every real mel frame starts a span of 32 frames with probability 2.5 % (the paper's numbers; "mask
  probability" read as the span-start probability, as SpeechBrain and WeNet read it: about 1 - 0.975^32 = 55 % of
  the frames of a long utterance masked). Spans are cut at the utterance's end. Masked frames become N(0, 0.1) noise.
- The loss (in the stage) counts an encoder frame when all its mel frames are masked: its whole input is hidden.

Shapes: B utterances, T mel frames, S = T / stack encoder frames, K codebooks, N codes each, h code width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.errors import ConfigError


@dataclass
class BestRQConfig:
    n_mels: int = 80
    stack: int = 4  # mel frames per encoder frame (the encoder's stacking)
    code_dim: int = 16  # §8.3.1: random projection to 16 dims
    codebook_size: int = 8192  # §8.3.1
    n_codebooks: int = 16  # §8.3.1: "16 different codebooks"
    mask_span: int = 32  # §8.3.1: spans of 32 frames
    mask_prob: float = 0.025  # §8.3.1: 2.5 %, the probability that a frame starts a span
    noise_std: float = 0.1  # BEST-RQ: masked frames replaced by N(0, 0.1)
    seed: int = 0  # the projection and codebooks

    def __post_init__(self) -> None:
        for name in ("n_mels", "stack", "code_dim", "codebook_size", "n_codebooks", "mask_span"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"best_rq {name} must be a positive integer, got {value!r}")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"best_rq mask_prob must be in (0, 1), got {self.mask_prob!r}")
        if not self.noise_std >= 0:
            raise ConfigError(f"best_rq noise_std must be >= 0, got {self.noise_std!r}")

    def expected_mask_fraction(self) -> float:
        """The fraction of an infinitely long utterance's frames that spans cover."""
        return 1 - (1 - self.mask_prob) ** self.mask_span


class RandomProjectionQuantizer(nn.Module):
    """Stacked mel frames -> the index of their nearest code in each frozen codebook (no gradient, no parameters)."""

    def __init__(self, config: BestRQConfig):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        d, h, K, N = config.stack * config.n_mels, config.code_dim, config.n_codebooks, config.codebook_size
        bound = (6 / (d + h)) ** 0.5  # Xavier-uniform, as BEST-RQ
        self.register_buffer("projection", (torch.rand(K, d, h, generator=generator) * 2 - 1) * bound)
        self.register_buffer("codebooks", F.normalize(torch.randn(K, N, h, generator=generator), dim=-1))

    @torch.no_grad()
    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """stacked (B, S, stack · n_mels) normalised mel frames -> codes (B, S, K) long."""
        z = F.normalize(torch.einsum("bsd,kdh->bksh", stacked.float(), self.projection), dim=-1)  # (B, K, S, h)
        # Cosine nearest neighbour as a matmul, one codebook at a time: (B, S, N) similarities at most, never the
        # (B, S, N, h) differences (SpeechBrain's form) nor all K codebooks' similarities at once.
        return torch.stack([(z[:, k] @ self.codebooks[k].T).argmax(-1) for k in range(z.shape[1])], dim=-1)


def span_mask(lengths: torch.Tensor, n_frames: int, config: BestRQConfig, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """(B, T) bool: True where a span covers a mel frame. Each real frame starts a span of `mask_span` frames with
    probability `mask_prob`; spans stop at the utterance's end; padding is never masked."""
    B = lengths.shape[0]
    real = torch.arange(n_frames)[None, :] < lengths[:, None].cpu()  # (B, T)
    starts = (torch.rand(B, n_frames, generator=generator) < config.mask_prob) & real
    # A frame is covered when a span started within the `mask_span` frames up to and including it.
    covered = F.max_pool1d(F.pad(starts.float()[:, None], (config.mask_span - 1, 0)), config.mask_span, stride=1)
    return (covered[:, 0] > 0) & real


def mask_frames(mel: torch.Tensor, mask: torch.Tensor, noise_std: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """mel (B, T, n_mels) with the masked frames replaced by N(0, noise_std) noise."""
    noise = torch.randn(mel.shape, generator=generator).to(mel.device, mel.dtype) * noise_std
    return torch.where(mask.to(mel.device)[..., None], noise, mel)


def target_frames(mask: torch.Tensor, stack: int) -> torch.Tensor:
    """(B, T) mel-frame mask -> (B, S) encoder frames whose stacked mel frames are all masked (S = ceil(T / stack);
    a last, partial group counts its real frames only, padding being never masked, so it is never a target)."""
    B, T = mask.shape
    return F.pad(mask, (0, (-T) % stack)).view(B, -1, stack).all(-1)
