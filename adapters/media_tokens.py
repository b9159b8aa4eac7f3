"""The trainable embedding rows of the media tokens (`<|image|>`, `<|video|>`, `<|speech_start|>`, …).

They live above the frozen vocabulary, as Llama 3.2 Vision's `learnable_embedding` does: ids n_vocab … n_vocab + 7 use
these 8 rows, every other id the trunk's frozen `tok_embeddings`, which is never resized.
"""

from __future__ import annotations

import torch
from torch import nn

N_MEDIA_ROWS = 8  # Llama 3.2 Vision's learnable_embedding has 8 rows (128256 … 128263)


class MediaTokenEmbedding(nn.Module):
    def __init__(self, dim: int, n_vocab: int, n_rows: int = N_MEDIA_ROWS):
        super().__init__()
        self.n_vocab = n_vocab
        self.learnable_embedding = nn.Embedding(n_rows, dim)

    def forward(self, tokens: torch.Tensor, tok_embeddings: nn.Embedding) -> torch.Tensor:
        """(B, T) ids -> (B, T, D): media ids from this table, the others from the frozen one."""
        media = tokens >= self.n_vocab
        frozen = tok_embeddings(tokens.masked_fill(media, 0))
        learned = self.learnable_embedding((tokens - self.n_vocab).clamp(min=0))  # row 0 for the others: unused
        return torch.where(media[..., None], learned.to(frozen.dtype), frozen)
