"""The video adapter (paper §7.2, §7.4-7.5): a temporal aggregator that merges each group of consecutive frames into
one effective frame, and gated video cross-attention blocks placed before every fourth image cross-attention block.

Each of a clip's F frames goes through the image encoder and its projection like a picture (frames are batched into
the ViT's image axis, never looped). The aggregator, a perceiver resampler, turns each group of G consecutive frames
(G · L frame tokens, L = tiles × tokens per tile) into Q latent tokens: one effective frame. The video blocks read
the F / G effective frames of each clip as their media tokens, with the same masks as images: a `<|video|>` covers
the text that follows it (`adapters.cross_attention.media_spans`).

What the paper leaves open, and the choices here (`VideoAdapterConfig`; README and issue 11's note say why):
- latents per effective frame: one frame's token count (Q = L), so that an effective frame has a frame's shape;
- depth 1, the trunk's heads, a SwiGLU FFN as wide as the trunk: one perceiver layer (latents attend to the group's
  frame tokens and to themselves, then the FFN). With 4 × 560-px tiles per frame (6,404 latents), the video adapter
  of the 8B layout has 0.58B parameters and that of the 70B layout 4.80B: the paper's 0.6B and 4.6B within 4 %
  (`tests/test_video_adapter.py`). A 4 · D FFN would give 0.67B and 5.14B;
- the latents start as their group's mean frame (`latents_from_frames`), so that an effective frame starts as a
  picture the image blocks can read, places included; the perceiver layer then refines it (what changed, when);
- time: a learned embedding per frame position within a group, added to that frame's tokens (without it the
  perceiver is permutation-invariant over frames and cannot tell "appears" from "disappears"), and a learned
  embedding per effective frame, added to its latents (the video blocks see no other order).

Shapes: B batch, V video slots per sample, F frames per clip, G frames per group, E = F / G effective frames, L
tokens per frame, Q latents per effective frame, D model dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from adapters.cross_attention import (
    KV,
    CrossAttention,
    CrossAttentionConfig,
    CrossAttentionInputs,
    GatedCrossAttention,
    cross_attention_inputs,
)
from mm_llama.errors import ConfigError
from mm_llama.llama import FeedForward, LlamaConfig, RMSNorm
from mm_llama.transfer import to_device
from mm_llama.values import is_finite_number

if TYPE_CHECKING:
    from encoders.video import Videos


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"video_adapter {name} must be a positive integer, got {value!r}")


@dataclass
class VideoAdapterConfig:
    """The video adapter's settings (widths and heads come from the trunk's `LlamaConfig`)."""

    n_frames: int = 64  # frames sampled per clip: 64 at fine-tuning and inference, 16 in pretraining (paper §7.4-7.5)
    group: int = 32  # consecutive frames merged into one effective frame: 32 on 64 frames (-> 2), 16 on 16 (-> 1)
    n_latents: int | None = None  # latents per effective frame; None: one frame's tokens (tiles × tokens per tile)
    depth: int = 1  # perceiver layers
    ffn_hidden_dim: int | None = None  # the perceiver's SwiGLU width; None: the trunk's width D
    every: int = 4  # one video block before every `every`-th image block, counted from the top like Meta's schedule
    # Both gates' initial value: 0 (the paper's) leaves the image model's output unchanged until the video blocks
    # learn; a trained checkpoint's gates replace it.
    gate_init: float = 0.0
    # The latents start as the mean of their group's frame tokens (plus a learned offset) and the perceiver refines
    # them: an effective frame starts as a frame the image blocks can read, places included. With learned latents
    # alone (False: Flamingo's resampler), the demo's video stage lost where things are (issue 11's note: held-out
    # "Where is the triangle at the end?" 44 %, the image model 100 %). Needs n_latents = one frame's tokens.
    latents_from_frames: bool = True
    # Each video block reads every effective frame ("moment") with its own softmax and mixes the E reads per channel
    # (learned weights, starting at 1/E): "where is the circle" is answered once per moment, so the block can compare
    # moments (a move: the late place minus the early one). One softmax over all moments averages the circle's places
    # into one. Costs E x the heads' width of parameters per block; the attention work is the same. The mix must
    # travel from 1/E to about +-1: train it faster (`train.lr_scales: {moment_mix: 30}`). The demo's video stage
    # learns time with it (held-out time questions 85 % against 67 % without, 1,100 steps; issue 11's note); off by
    # default, as the paper's plain cross-attention.
    read_moments: bool = False
    # One more effective frame after the others: the last minus the first, plus a learned embedding. What changed
    # where, in one frame: a read of it at a moved shape's places is linear in the move (a linear probe on the
    # demo's frozen encoder reads a move's direction from it at 100 %, issue 11's note). Its latents are the
    # difference of the others', so it adds one embedding's parameters.
    change_frame: bool = False

    def __post_init__(self) -> None:
        for name in ("n_frames", "group", "depth", "every"):
            _positive_int(name, getattr(self, name))
        for name in ("n_latents", "ffn_hidden_dim"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.n_frames % self.group:
            raise ConfigError(f"video_adapter n_frames ({self.n_frames}) must be a multiple of group ({self.group}): "
                              "each group of consecutive frames becomes one effective frame")
        for name in ("latents_from_frames", "read_moments", "change_frame"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"video_adapter {name} must be true or false, got {getattr(self, name)!r}")
        if not is_finite_number(self.gate_init):
            raise ConfigError(f"video_adapter gate_init must be a finite number, got {self.gate_init!r}")

    @property
    def n_effective_frames(self) -> int:
        return self.n_frames // self.group

    @property
    def n_moments(self) -> int:
        """The effective frames the video blocks read: the groups', and the change frame if there is one."""
        return self.n_effective_frames + self.change_frame


def video_schedule(image_schedule: Sequence[int], every: int) -> list[int]:
    """The trunk layers the video blocks precede: those of every `every`-th image block, counted from the top (8
    image blocks -> the trunk layers of blocks 3 and 7; 3 blocks -> that of block 2). A video block runs just
    before the image block of the same trunk layer."""
    if not image_schedule:
        raise ConfigError("the video adapter needs an image adapter with at least one block")
    return sorted(image_schedule[j] for j in range(len(image_schedule) - 1, -1, -every))


class PerceiverLayer(nn.Module):
    """Latents attend to a group's frame tokens and to themselves (keys/values from both, as Flamingo's
    resampler), then a SwiGLU FFN; both residual."""

    def __init__(self, trunk: LlamaConfig, ffn_hidden_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = trunk.n_heads, trunk.head_dim
        inner = self.n_heads * self.head_dim
        self.media_norm = RMSNorm(trunk.dim, trunk.norm_eps)
        self.latent_norm = RMSNorm(trunk.dim, trunk.norm_eps)
        self.wq = nn.Linear(trunk.dim, inner, bias=False)
        self.wk = nn.Linear(trunk.dim, inner, bias=False)
        self.wv = nn.Linear(trunk.dim, inner, bias=False)
        self.wo = nn.Linear(inner, trunk.dim, bias=False)
        self.ffn_norm = RMSNorm(trunk.dim, trunk.norm_eps)
        self.feed_forward = FeedForward(trunk.dim, ffn_hidden_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (N, S, H·Hd) -> (N, H, S, Hd)

    def forward(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """latents (N, Q, D), frames (N, G · L, D) -> latents (N, Q, D); N = clips × effective frames."""
        queries = self.latent_norm(latents)
        context = torch.cat([self.media_norm(frames), queries], dim=1)  # (N, G·L + Q, D)
        out = F.scaled_dot_product_attention(self._heads(self.wq(queries)), self._heads(self.wk(context)),
                                             self._heads(self.wv(context)))  # (N, H, Q, Hd)
        latents = latents + self.wo(out.transpose(1, 2).flatten(2))
        return latents + self.feed_forward(self.ffn_norm(latents))


class TemporalAggregator(nn.Module):
    """Perceiver resampler: (clips, F, L, D) frame tokens -> (clips, E, Q, D) effective frames."""

    def __init__(self, trunk: LlamaConfig, config: VideoAdapterConfig, tokens_per_frame: int):
        super().__init__()
        self.group = config.group
        n_latents = config.n_latents or tokens_per_frame
        self.from_frames = config.latents_from_frames
        if self.from_frames and n_latents != tokens_per_frame:
            raise ConfigError(f"video_adapter latents_from_frames needs n_latents = one frame's tokens "
                              f"({tokens_per_frame}), got {n_latents}: the latents start as the group's mean frame")
        self.latents = nn.Parameter(torch.randn(n_latents, trunk.dim) * 0.02)
        self.time_embedding = nn.Parameter(torch.randn(config.group, trunk.dim) * 0.02)  # per frame of a group
        self.frame_embedding = nn.Parameter(torch.randn(config.n_effective_frames, trunk.dim) * 0.02)  # per group
        self.change_embedding = nn.Parameter(torch.zeros(trunk.dim)) if config.change_frame else None
        width = config.ffn_hidden_dim or trunk.dim
        self.layers = nn.ModuleList(PerceiverLayer(trunk, width) for _ in range(config.depth))
        # Learned latents live on their own scale: normed on the way out. Latents from frames stay in the frame
        # tokens' space and scale (the image blocks' values read them as they read a picture's), so no norm.
        self.norm = None if self.from_frames else RMSNorm(trunk.dim, trunk.norm_eps)

    @property
    def n_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (C, F, L, D) projected frame tokens of C clips -> (C, E, Q, D), E + 1 with the change frame."""
        C, n_frames, L, D = frames.shape
        E = n_frames // self.group
        if E * self.group != n_frames or E > self.frame_embedding.shape[0]:
            raise ValueError(f"{n_frames} frames per clip: the aggregator takes a multiple of {self.group} frames, at "
                             f"most {self.frame_embedding.shape[0] * self.group}")
        by_group = frames.view(C, E, self.group, L, D)
        grouped = (by_group + self.time_embedding.to(frames.dtype)[:, None, :]).reshape(C * E, self.group * L, D)
        latents = self.latents.to(frames.dtype)[None, None] + self.frame_embedding.to(frames.dtype)[:E, None, :]
        if self.from_frames:
            latents = latents + by_group.mean(dim=2)  # (C, E, L, D): each group's mean frame
        latents = latents.expand(C, E, -1, -1).reshape(C * E, self.n_latents, D)
        for layer in self.layers:
            latents = layer(latents, grouped)
        out = (latents if self.norm is None else self.norm(latents)).view(C, E, self.n_latents, D)
        if self.change_embedding is not None:  # (C, E + 1, Q, D): what changed from the first moment to the last
            change = out[:, -1] - out[:, 0] + self.change_embedding.to(out.dtype)
            out = torch.cat([out, change[:, None]], dim=1)
        return out


class MomentCrossAttention(CrossAttention):
    """Cross-attention over a clip's effective frames that reads each moment on its own: one softmax per moment
    over that moment's tokens (of every video slot; the mask keeps the clip that covers the text), then the E reads
    mixed per channel by `moment_mix` (E, H · Hd), before `wo`. With `moment_mix` at 1/E it is the mean of E
    ordinary reads, one per moment. Keys/values are the ordinary ones (`kv`): the generation cache is unchanged."""

    def __init__(self, trunk: LlamaConfig, n_moments: int, tokens_per_moment: int):
        super().__init__(trunk)
        self.n_moments, self.tokens_per_moment = n_moments, tokens_per_moment
        self.moment_mix = nn.Parameter(torch.full((n_moments, self.n_heads * self.head_dim), 1.0 / n_moments))

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None) -> torch.Tensor:
        k, v = kv  # (B, K, N, Hd), N = V · E · Q
        B, T, _ = x.shape
        E, Q = self.n_moments, self.tokens_per_moment
        V = k.shape[2] // (E * Q)

        def by_moment(t: torch.Tensor) -> torch.Tensor:  # (B, K, V·E·Q, Hd) -> (B·E, K, V·Q, Hd)
            return t.unflatten(2, (V, E, Q)).permute(0, 3, 1, 2, 4, 5).flatten(3, 4).flatten(0, 1)

        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Hd)
        q = q[:, None].expand(B, E, *q.shape[1:]).flatten(0, 1)  # (B·E, H, T, Hd)
        if mask is not None:  # (B, 1, T, V·E·Q) -> (B·E, 1, T, V·Q)
            mask = mask.unflatten(3, (V, E, Q)).permute(0, 4, 1, 2, 3, 5).flatten(4, 5).flatten(0, 1)
        out = F.scaled_dot_product_attention(q, by_moment(k), by_moment(v), attn_mask=mask,
                                             enable_gqa=self.n_kv_heads != self.n_heads)  # (B·E, H, T, Hd)
        out = out.unflatten(0, (B, E)).permute(0, 3, 1, 2, 4).flatten(3, 4)  # (B, T, E, H·Hd)
        return self.wo((out * self.moment_mix.to(out.dtype)).sum(dim=2))


class VideoAdapter(GatedCrossAttention):
    """The video cross-attention blocks (a `GatedCrossAttention` on `video_schedule`, shaped like the image blocks,
    Meta's row masking; with `read_moments`, each block's attention a `MomentCrossAttention`) and the temporal
    aggregator that makes their media tokens."""

    def __init__(self, trunk: LlamaConfig, config: VideoAdapterConfig, image_schedule: Sequence[int],
                 tokens_per_frame: int):
        layers = tuple(video_schedule(image_schedule, config.every))
        super().__init__(trunk, CrossAttentionConfig(n_layers=len(layers), layers=layers, gate_init=config.gate_init))
        self.video_config = config
        self.aggregator = TemporalAggregator(trunk, config, tokens_per_frame)
        if config.read_moments:
            for block in self.cross_attention_layers:
                block.attention = MomentCrossAttention(trunk, config.n_moments, self.aggregator.n_latents)


def encode_videos(videos: Videos, encoder: nn.Module, projection: nn.Module, aggregator: TemporalAggregator
                  ) -> torch.Tensor:
    """Tiled clips -> their effective frames (B, V · E · Q, D), padding slots zero.

    Only the real clips run: their F frames go through the image encoder as F images of one sample each (batched,
    every frame with its clip's aspect ratio and tiles), then the projection and the aggregator.
    """
    B, V, n_frames, n_tiles = videos.pixel_values.shape[:4]
    real = [(b, v) for b in range(B) for v in range(videos.n_videos[b])]  # on the host
    index_b, index_v = torch.tensor([b for b, _ in real]), torch.tensor([v for _, v in real])
    pixels = videos.pixel_values[index_b, index_v].to(projection.weight.dtype)  # (C, F, N, 3, T, T)
    ratio_ids = videos.aspect_ratio_ids[index_b, index_v][:, None].repeat(1, n_frames)  # (C, F)
    tile_mask = videos.tile_mask[index_b, index_v][:, None, :].repeat(1, n_frames, 1)  # (C, F, N), host
    features = encoder(pixels, ratio_ids, to_device(tile_mask, pixels.device))  # (C, F, N, L, F_enc)
    effective = aggregator(projection(features).flatten(2, 3))  # (C, E, Q, D)
    out = effective.new_zeros(B, V, *effective.shape[1:])
    out[index_b.to(out.device), index_v.to(out.device)] = effective
    return out.flatten(1, 3)


def video_inputs(tokens: Sequence[Sequence[int]], videos: Videos, effective: torch.Tensor, n_effective: int, *,
                 video_id: int, adapter: VideoAdapter | None = None) -> CrossAttentionInputs:
    """The video blocks' inputs for the text `tokens` (B rows of ids, read on the host).

    Args:
        effective: `encode_videos`' output (B, V · E · Q, D); n_effective: E (`VideoAdapterConfig.n_moments`).
        video_id: the `<|video|>` id; each sample needs one per video, where the text it covers starts.
        adapter: given, the keys/values of every block are computed here, once (generation); None, each block
            computes its own inside its forward (training).
    """
    n_slots = videos.tile_mask.shape[1]
    real = torch.arange(n_slots)[None, :] < torch.tensor(list(videos.n_videos))[:, None]  # (B, V)
    slot_mask = real[:, :, None].repeat(1, 1, n_effective)  # (B, V, E): every effective frame of a real clip
    kv = adapter.kv(effective) if adapter is not None else None
    return cross_attention_inputs(tokens, video_id, videos.n_videos, slot_mask,
                                  effective.shape[1] // (n_slots * n_effective),
                                  source=effective if kv is None else None, kv=kv)
