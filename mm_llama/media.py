"""The media of a batch, typed: what `MMLlama.forward(tokens, media)` takes, and what its layer loop reads.

`Media` holds one prepared input per medium (a field each, all optional). `MMLlama.prepare` turns it into a
`MediaState` for given tokens: each gated cross-attention adapter's inputs (`adapters.cross_attention.
CrossAttentionInputs`) and the embeddings spliced into the token stream (`Splice`). Generation treats a `MediaState`
as opaque: it asks it for the state of a one-token decode step and copies its tensors into persistent buffers.

This module imports nothing from `encoders/` or `adapters/` (annotations only), so that `generate.py` stays free of
any medium.

Shapes: B batch, T positions, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mm_llama.errors import InputError
from mm_llama.transfer import tensor_to_device

if TYPE_CHECKING:
    from adapters.cross_attention import CrossAttentionInputs
    from encoders.image_transform import Images
    from encoders.utterances import Utterances
    from encoders.video import Videos


@dataclass
class EmbeddingSpans:
    """Embeddings that enter the token stream in place of token embeddings (the splice path; speech uses it).

    Span k puts `embeddings[k]` (L_k, D) at positions `starts[k]` … `starts[k] + L_k - 1` of sample `samples[k]`,
    positions counted in that sample's own tokens (generation adds each row's left padding). Prefill only: a decode
    step's new token is never spliced.
    """

    embeddings: list[torch.Tensor]
    samples: list[int]
    starts: list[int]

    def __post_init__(self) -> None:
        if not len(self.embeddings) == len(self.samples) == len(self.starts):
            raise InputError(f"EmbeddingSpans needs one sample and one start per span: {len(self.embeddings)} "
                             f"embeddings, {len(self.samples)} samples, {len(self.starts)} starts")
        for k, e in enumerate(self.embeddings):
            if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[0] == 0:
                raise InputError(f"span {k}: embeddings must be a non-empty (L, D) tensor, got "
                                 f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")

    def to(self, device: torch.device | str) -> EmbeddingSpans:
        return EmbeddingSpans([e.to(device) for e in self.embeddings], list(self.samples), list(self.starts))


@dataclass
class Media:
    """One batch's media, each already prepared for its encoder (a field per medium; None = absent).

    images: the tiled images (`encoders.image_transform.Images`; `Images.prepare` makes them from paths, PIL
        images or uint8 arrays); each needs an `<|image|>` token in its sample's text.
    videos: the sampled, tiled clips (`encoders.video.Videos`; `Videos.prepare` makes them from paths); each needs
        a `<|video|>` token in its sample's text.
    speech: the utterances (`encoders.utterances.Utterances`; `Utterances.from_waves` makes them from the 16 kHz
        chunks `audio_chunks` reads from paths, bytes or (waveform, sample_rate)), in the order of their spans:
        utterance k fills the k-th `<|speech_start|>` span of the batch, whose `<|speech|>` tokens must number its
        positions (`MMLlama.speech_positions`).
    embeddings: embeddings spliced into the token stream at given positions (`EmbeddingSpans`).
    """

    images: Images | None = None
    videos: Videos | None = None
    speech: Utterances | None = None
    embeddings: EmbeddingSpans | None = None

    def to(self, device: torch.device | str) -> Media:
        """Every medium's tensors on `device` (what stays on the host to be read there, e.g. tile masks, stays)."""
        return Media(images=None if self.images is None else self.images.to(device),
                     videos=None if self.videos is None else self.videos.to(device),
                     speech=None if self.speech is None else self.speech.to(device),
                     embeddings=None if self.embeddings is None else self.embeddings.to(device))


@dataclass
class Splice:
    """Embedding spans resolved for a (B, T) batch: `values` (S, D) go to rows `rows` (S,) and positions `cols`
    (S,), index tensors on the embeddings' device."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    @classmethod
    def resolve(cls, spans: EmbeddingSpans, batch: int, length: int, dim: int,
                left_pad: Sequence[int] | None = None) -> Splice:
        """Check the spans against a (batch, length) token batch of width `dim` (on the host) and resolve them.
        `left_pad[b]`: pad positions in front of sample b, added to its spans' starts."""
        rows, cols = [], []
        taken: dict[int, set[int]] = {}
        for k, (e, b, start) in enumerate(zip(spans.embeddings, spans.samples, spans.starts, strict=True)):
            if not 0 <= b < batch:
                raise InputError(f"span {k}: sample {b} is not in a batch of {batch}")
            if e.shape[1] != dim:
                raise InputError(f"span {k}: embeddings of width {e.shape[1]}, the model's is {dim}")
            first = start + (left_pad[b] if left_pad is not None else 0)
            if start < 0 or first + e.shape[0] > length:
                raise InputError(f"span {k}: positions {start}..{start + e.shape[0] - 1} of sample {b} are outside "
                                 f"its {length - (left_pad[b] if left_pad is not None else 0)} tokens")
            positions = set(range(first, first + e.shape[0]))
            if positions & taken.setdefault(b, set()):
                raise InputError(f"span {k} overlaps another span of sample {b}")
            taken[b] |= positions
            rows += [b] * e.shape[0]
            cols += range(first, first + e.shape[0])
        device = spans.embeddings[0].device
        values = torch.cat(spans.embeddings)  # (S, D)
        return cls(tensor_to_device(rows, device), tensor_to_device(cols, device), values)

    def place(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) token embeddings -> the same with the spans in place (out of place: gradients reach both)."""
        return h.index_put((self.rows, self.cols), self.values.to(h.dtype))


@dataclass
class MediaState:
    """What the layer loop reads besides the tokens: each cross-attention adapter's inputs (by adapter name, in the
    order the model runs them) and the spliced embeddings (prefill only)."""

    cross: dict[str, CrossAttentionInputs] = field(default_factory=dict)
    splice: Splice | None = None

    def for_decode(self) -> MediaState:
        """The state of a one-token decode step: each adapter's cached keys/values with the last position's
        mask and rows; nothing spliced."""
        return MediaState({name: inputs.for_decode() for name, inputs in self.cross.items()})

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MediaState:
        """The same state with `fn` applied to every tensor of the cross-attention inputs (spliced embeddings are
        prefill-only and keep theirs)."""
        return MediaState({name: inputs.map_tensors(fn) for name, inputs in self.cross.items()}, self.splice)
