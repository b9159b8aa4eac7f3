"""Gated cross-attention adapters (paper §7.2; Llama 3.2 Vision's layout, Meta's parameter names).

A `GatedCrossAttention` adapter is a schedule (the trunk layers its blocks run before) + its blocks + the inputs they
read (`CrossAttentionInputs`: the media tokens' keys/values, a mask, the rows that have seen media). The image adapter
is one instance; the video adapter is another, with its own schedule. Each block:

    h   = x + tanh(gate_attn) · rows · wo(attn(q_norm(wq · norm(x)), k_norm(wk · media), wv · media))
    out = h + tanh(gate_ffwd) · rows · SwiGLU(ffn_norm(h))

`rows` zeroes the text positions that have seen no media yet (Meta applies it on both branches; HF transformers
only on the second, issue 39379 — `mask_attention_rows=False` reproduces that). Gates start at zero, so a fresh
adapter leaves the trunk's output unchanged. Keys and values depend only on the media: generation computes them once
per request (`GatedCrossAttention.kv`); training lets each block compute its own inside its forward, where FSDP has
gathered the block's weights.

Which text a media token covers follows Meta's rule for `<|image|>` (`media_spans`): from the token up to the next
one of the same kind; consecutive tokens share the text that follows the last of them.

Shapes: B batch, T text positions, N media tokens (items × slots × tokens per slot, e.g. images × tiles × patches),
D model dim, H heads, K kv heads (the trunk's grouping), Hd head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.errors import ConfigError, InputError
from mm_llama.llama import FeedForward, LlamaConfig, RMSNorm
from mm_llama.transfer import to_device
from mm_llama.values import is_finite_number

KV = tuple[torch.Tensor, torch.Tensor]  # keys and values of the media tokens, each (B, K, N, Hd)


@dataclass
class CrossAttentionConfig:
    """One adapter's settings; its widths come from the trunk's `LlamaConfig`.

    `layers` places the blocks explicitly: block j runs just before trunk layer `layers[j]` (non-decreasing; equal
    entries run in order before the same layer; n_trunk_layers means after the last layer). None: Llama 3.2's rule
    (`fusion_schedule`). Hugging Face's `cross_attention_layers` list maps to it as `layers[j] = hf[j] - j`.
    """

    n_layers: int = 8  # 8 blocks for Llama 3.2 11B (32 trunk layers), 20 for 90B (80 trunk layers)
    layers: tuple[int, ...] | None = None
    mask_attention_rows: bool = True  # Meta: zero rows without media on both branches; False: HF transformers
    # Both gates' initial value. 0 is the paper's: the adapter starts as the identity, so the trunk's behaviour on
    # text after an image is untouched at first (text with no image before it is untouched anyway: `rows`). With a
    # ViT trained from scratch (the demo) the zero gates stayed near 0 and the blocks near their initial weights;
    # 0.5 lets them train (issue 10: held-out image QA 61 % -> 71 % in 2,000 steps). A trained checkpoint's gates
    # replace it.
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.n_layers, int) or isinstance(self.n_layers, bool) or self.n_layers < 1:
            raise ConfigError(f"cross-attention n_layers must be a positive integer, got {self.n_layers!r}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.layers) or list(
                    self.layers) != sorted(self.layers):
                raise ConfigError(f"cross-attention layers must be non-decreasing trunk-layer indices >= 0, got "
                                  f"{list(self.layers)}")
            if len(self.layers) != self.n_layers:
                raise ConfigError(f"cross-attention layers has {len(self.layers)} entries but n_layers is "
                                  f"{self.n_layers}; they must match")
        if not is_finite_number(self.gate_init):
            raise ConfigError(f"cross-attention gate_init must be a finite number, got {self.gate_init!r}")


def fusion_schedule(n_trunk_layers: int, n_blocks: int) -> list[int]:
    """Trunk layer indices that a cross-attention block precedes (Meta's rule, counted from the top)."""
    if not 1 <= n_blocks <= n_trunk_layers:
        raise ConfigError(f"{n_blocks} cross-attention blocks cannot be spread over {n_trunk_layers} trunk layers")
    step = math.ceil(n_trunk_layers / n_blocks)
    return list(range(n_trunk_layers))[::-1][::step][:n_blocks][::-1]


def cross_attention_schedule(n_trunk_layers: int, config: CrossAttentionConfig) -> list[int]:
    """The trunk layers the blocks of `config` precede: its explicit `layers`, else Llama 3.2's rule."""
    if config.layers is None:
        return fusion_schedule(n_trunk_layers, config.n_layers)
    if config.layers and config.layers[-1] > n_trunk_layers:
        raise ConfigError(f"cross-attention layers {list(config.layers)} go past the trunk's {n_trunk_layers} "
                          f"layers (the largest position is {n_trunk_layers}: after the last layer)")
    return list(config.layers)


class CrossAttention(nn.Module):
    def __init__(self, trunk: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = trunk.n_heads, trunk.n_kv_heads, trunk.head_dim
        self.wq = nn.Linear(trunk.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(trunk.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(trunk.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, trunk.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, trunk.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, trunk.norm_eps)

    def kv(self, media: torch.Tensor) -> KV:
        """Keys and values of projected media tokens (B, N, D): each (B, K, N, Hd); no RoPE."""
        B, N, _ = media.shape
        k = self.k_norm(self.wk(media).view(B, N, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(media).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Hd)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class CrossAttentionBlock(nn.Module):
    def __init__(self, trunk: LlamaConfig, config: CrossAttentionConfig):
        super().__init__()
        self.mask_attention_rows = config.mask_attention_rows
        self.attention_norm = RMSNorm(trunk.dim, trunk.norm_eps)
        self.attention = CrossAttention(trunk)
        self.gate_attn = nn.Parameter(torch.full((1,), float(config.gate_init)))
        self.ffn_norm = RMSNorm(trunk.dim, trunk.norm_eps)
        self.feed_forward = FeedForward(trunk.dim, trunk.ffn_hidden_dim)
        self.gate_ffwd = nn.Parameter(torch.full((1,), float(config.gate_init)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor, *, kv: KV | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, N) bool or None (every media token visible); rows (B, T, 1): 1 where the
        position has seen media. Exactly one of `kv` (this block's cached keys/values: generation) and `source`
        (the projected media tokens (B, N, D), whose keys/values are computed here, inside the forward where FSDP
        has gathered the weights: training)."""
        if kv is None:
            kv = self.attention.kv(source)
        attn = self.attention(self.attention_norm(x), kv, mask)
        if self.mask_attention_rows:
            attn = attn * rows
        h = x + self.gate_attn.tanh() * attn
        return h + self.gate_ffwd.tanh() * (self.feed_forward(self.ffn_norm(h)) * rows)


class GatedCrossAttention(nn.Module):
    """The blocks of one adapter and the trunk layers they precede. `cross_attention_layers.J` are Meta's names."""

    def __init__(self, trunk: LlamaConfig, config: CrossAttentionConfig):
        super().__init__()
        self.config = config
        self.schedule = cross_attention_schedule(trunk.n_layers, config)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(trunk, config) for _ in self.schedule)

    def kv(self, media: torch.Tensor) -> list[KV]:
        """Keys and values of every block for projected media tokens (B, N, D): the cross-attention cache."""
        return [block.attention.kv(media) for block in self.cross_attention_layers]


@dataclass
class CrossAttentionInputs:
    """What the blocks of one adapter read in one forward besides the hidden states.

    Exactly one of `source` (projected media tokens (B, N, D): each block computes its keys/values inside its own
    forward — training) and `kv` (per block, computed once per request — generation).
    """

    mask: torch.Tensor | None  # (B, 1, T, N) bool: True where a text position may attend; None: every token
    rows: torch.Tensor  # (B, T, 1): 1 where the position has seen media
    source: torch.Tensor | None = None
    kv: list[KV] | None = None
    last_sees_all: bool = False  # the last position sees every media token (read on the host)

    def block_kwargs(self, j: int) -> dict:
        """Block j's `kv`/`source` keywords."""
        return {"kv": self.kv[j]} if self.kv is not None else {"source": self.source}

    def for_decode(self) -> CrossAttentionInputs:
        """The inputs of a one-token decode step: new tokens see what the prompt's last position sees (Meta's and
        HF's rule), so the last row of the mask and rows; no mask at all when that is every token, so that SDPA
        may take a fused kernel."""
        if self.kv is None:
            raise ValueError("a decode step needs precomputed keys/values (prepare with for_decoding=True)")
        mask = None if self.last_sees_all or self.mask is None else self.mask[:, :, -1:]
        return replace(self, mask=mask, rows=self.rows[:, -1:])

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CrossAttentionInputs:
        """The same inputs with `fn` applied to every tensor (e.g. copies into buffers that CUDA graphs replay)."""
        return replace(self, mask=None if self.mask is None else fn(self.mask), rows=fn(self.rows),
                       source=None if self.source is None else fn(self.source),
                       kv=None if self.kv is None else [(fn(k), fn(v)) for k, v in self.kv])


def media_spans(tokens: Sequence[int], media_id: int) -> list[tuple[int, int]]:
    """[start, end) of the text each media token of one sample covers (Meta's `create_vision_mask` rule).

    A media token covers the positions from itself up to the next one; consecutive media tokens all cover the text
    that follows the last of them; the last covers the rest of the sequence.
    """
    locations = [i for i, t in enumerate(tokens) if t == media_id]
    ends = (locations[1:] + [len(tokens)]) if locations else []
    spans = [[start, end] for start, end in zip(locations, ends, strict=True)]
    following = len(tokens)
    for span in reversed(spans):
        if span[0] == span[1] - 1:  # immediately followed by another media token: share that one's text
            span[1] = following
        following = span[1]
    return [(a, b) for a, b in spans]


def slot_visibility(tokens: Sequence[Sequence[int]], media_id: int, n_items: Sequence[int],
                    slot_mask: torch.Tensor) -> torch.Tensor:
    """Which slots (e.g. tiles) of which media items each text position sees, on the CPU.

    Args:
        tokens: B rows of ids (read on the host); each row's count of `media_id` must equal its entry of `n_items`.
        n_items: media items per sample (the rest of the I item slots are padding).
        slot_mask: (B, I, S) bool, True for real slots (read on the host too).
    Returns:
        (B, T, I, S) bool CPU tensor: position t of sample b sees slot s of item i.
    """
    slot_mask = slot_mask.cpu()
    B, T = len(tokens), len(tokens[0])
    visible = torch.zeros(B, T, slot_mask.shape[1], dtype=torch.bool)  # text position b, t sees item i
    for b, row in enumerate(tokens):
        spans = media_spans(row, media_id)
        if len(spans) != n_items[b]:
            raise InputError(f"sample {b} has {len(spans)} media token(s) (id {media_id}) but {n_items[b]} media "
                             "item(s); each item needs exactly one token where its text starts")
        for i, (start, end) in enumerate(spans):
            visible[b, start:end, i] = True
    return visible[:, :, :, None] & slot_mask[:, None, :, :]


def cross_attention_inputs(tokens: Sequence[Sequence[int]], media_id: int, n_items: Sequence[int],
                           slot_mask: torch.Tensor, tokens_per_slot: int, *, source: torch.Tensor | None = None,
                           kv: list[KV] | None = None) -> CrossAttentionInputs:
    """Masks of a batch for one adapter's blocks, built on the host and sent without waiting for queued GPU work.

    Args:
        tokens, media_id, n_items, slot_mask: as for `slot_visibility`.
        tokens_per_slot: media tokens per slot (per tile, for images).
        source, kv: the media tokens (B, N, D) or their per-block keys/values; the masks go to their device.
    Returns:
        The inputs: mask (B, 1, T, I * S * tokens_per_slot) — rows that see no media are all True (a uniform, finite
        softmax) and zeroed by `rows` (B, T, 1), 1 where the position has seen media.
    """
    like = source if source is not None else kv[0][0]
    per_slot = slot_visibility(tokens, media_id, n_items, slot_mask)  # (B, T, I, S)
    B, T, n_items_max, n_slots = per_slot.shape
    last_sees_all = bool(per_slot[:, -1].all())
    per_slot = to_device(per_slot, like.device)
    mask = per_slot.repeat_interleave(tokens_per_slot, dim=3).reshape(B, 1, T, n_items_max * n_slots * tokens_per_slot)
    seen = mask.any(dim=-1)  # (B, 1, T)
    mask = mask | ~seen[..., None]
    rows = seen.transpose(1, 2).to(like.dtype)  # (B, T, 1)
    return CrossAttentionInputs(mask, rows, source=source, kv=kv, last_sees_all=last_sees_all)
