"""Generation from a composed model (`MMLlama`): a preallocated KV cache, separate prefill and decode steps, sampling,
streaming, taps.

This module knows no medium: the model prepares a request's media state (`MMLlama.prepare`), and the state itself
says what a one-token decode step reads (`for_decode`); generation only passes it along, copied into persistent
buffers when CUDA graphs replay the decode step. The pieces follow gpt-fast's shape: `prefill`, `decode_one` and the
loop (`Generator.stream_steps`).

Batches of prompts with different lengths are left-padded: every row writes the same cache slot at each step, so
one decode step serves the whole batch, while each row keeps its own RoPE positions (0 at its first real token) and
its own mask (pad slots are never attended to). The result equals generating each prompt alone.

With `compile=True` (GPU) the decode step is compiled once with CUDA graphs (gpt-fast style): the cache tensors are
marked static, and every step has the same shapes. The cache length is rounded up to a bucket so that calls with
similar lengths reuse the compiled graph.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mm_llama.errors import InputError
from mm_llama.llama import Llama
from mm_llama.tokenizer import StreamDecoder, Tokenizer
from mm_llama.transfer import tensor_to_device
from mm_llama.values import is_finite_number, is_int

if TYPE_CHECKING:
    from mm_llama.media import Media, MediaState

CACHE_BUCKET = 256  # cache lengths are multiples of this: one compiled graph per bucket
# Attention kernels for one query per row. cuDNN's (PyTorch's first choice on Hopper) costs ~8 us per layer here;
# without it the compiled 8B decode went from 213 to 220 tok/s on an H200 (benchmarks/trunk_decode.py).
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Keys and values of every layer, each (B, K, S, Hd), written in place at the slots a step covers."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    @classmethod
    def for_model(cls, model: Llama, batch_size: int, max_len: int) -> "KVCache":
        c, w = model.config, model.tok_embeddings.weight
        return cls(c.n_layers, batch_size, max_len, c.n_kv_heads, c.head_dim, w.dtype, w.device)

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move, so CUDA graphs may mutate them in place."""
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t)

    def update(self, layer_id: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, Hd) at slots `cache_pos` (T,); return the whole cache of the layer (B, K, S, Hd)."""
        self.k[layer_id].index_copy_(2, cache_pos, k)
        self.v[layer_id].index_copy_(2, cache_pos, v)
        return self.k[layer_id], self.v[layer_id]


def attention_mask(cache_pos: torch.Tensor, first_slot: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: query at slot i sees slots j with first_slot[b] <= j <= i.

    `first_slot` (B,) is each row's first real (non-pad) slot. A pad query (i < first_slot) sees only itself, so its
    softmax has one finite term (an all-masked row would give NaN, and NaN keys poison every row through 0 * NaN).
    """
    slots = torch.arange(cache_len, device=cache_pos.device)
    causal = slots[None, :] <= cache_pos[:, None]  # (T, S)
    real = slots[None, None, :] >= first_slot[:, None, None]  # (B, 1, S)
    itself = slots[None, :] == cache_pos[:, None]
    return (causal[None] & (real | itself[None]))[:, None]


@dataclass
class Sampling:
    """How to pick each next token. temperature 0 means greedy (the default).

    `max_new_tokens` is a maximum: an answer also ends at a stop token and where the model's context ends.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [("max_new_tokens", self.max_new_tokens, is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                   "an integer >= 1"),
                  ("temperature", self.temperature, is_finite_number(self.temperature) and self.temperature >= 0,
                   "a finite number >= 0 (0 = greedy)"),
                  ("top_k", self.top_k, self.top_k is None or (is_int(self.top_k) and self.top_k >= 1),
                   "an integer >= 1 or None"),
                  ("top_p", self.top_p, is_finite_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("seed", self.seed, self.seed is None or is_int(self.seed), "an integer or None")]
        for name, value, ok, accepted in checks:
            if not ok:
                raise InputError(f"{name} must be {accepted}, got {value!r}")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) next token ids."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Composed(Protocol):
    """What generation reads of a model (`mm_llama.model.MMLlama`)."""

    trunk: Llama
    n_token_ids: int

    def encoders(self) -> dict[str, nn.Module]: ...

    def prepare(self, tokens, media, *, left_pad, for_decoding: bool, encoders) -> MediaState | None: ...

    def step(self, tokens: torch.Tensor, state: MediaState | None = None, *, positions, mask, cache, cache_pos,
             last_only: bool = False, taps: Sequence[int] = ()): ...


def prefill(model: Composed, tokens: torch.Tensor, positions: torch.Tensor, first_slot: torch.Tensor, cache: KVCache,
            state: MediaState | None, taps: Sequence[int]):
    """The whole (left-padded) prompts (B, T) at slots 0..T-1 -> `Step` of the last position: logits (B, 1, V)."""
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    mask = attention_mask(slots, first_slot, cache.max_len)
    return model.step(tokens, state, positions=positions, mask=mask, cache=cache, cache_pos=slots, last_only=True,
                      taps=taps)


def decode_one(model: Composed, tokens: torch.Tensor, cache_pos: torch.Tensor, first_slot: torch.Tensor,
               cache: KVCache, state: MediaState | None, taps: Sequence[int]):
    """One token per row: (B, 1) ids at slot `cache_pos` (1,) -> `Step`: logits (B, 1, V)."""
    mask = attention_mask(cache_pos, first_slot, cache.max_len)
    positions = (cache_pos - first_slot)[:, None]  # (B, 1): each row's own position
    return model.step(tokens, state, positions=positions, mask=mask, cache=cache, cache_pos=cache_pos, taps=taps)


class _HostCopy:
    """Copies a few token ids to the host without waiting for the work queued after them (pinned memory + event)."""

    def __init__(self, n: int, device: torch.device):
        cuda = device.type == "cuda"
        self.host = torch.empty(n, dtype=torch.long, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None

    def start(self, tokens: torch.Tensor) -> None:
        self.host.copy_(tokens, non_blocking=True)
        if self.event is not None:
            self.event.record()

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Emitted(NamedTuple):
    """One generation step: the new token of each row (None once the row has stopped) and the requested taps of the
    position whose logits chose them (the prompt's last position for the first token), (B, 1, D) each."""

    tokens: list[int | None]
    taps: tuple[torch.Tensor, ...]


class Generator:
    """Generates from a composed model, reusing KV caches (and compiled graphs) across calls.

    Args:
        model: an `MMLlama` (a text-only one for a plain trunk: `MMLlama(MMConfig(trunk=trunk.config),
            trunk=trunk)`), already on its device and dtype.
        compile: compile the decode step with CUDA graphs, the prefill with symbolic lengths and the media encoders
            (GPU only; the first call per cache bucket compiles).
    """

    def __init__(self, model: Composed, *, compile: bool = False):
        self.model = model
        self.trunk = model.trunk
        self.vocab_limit = model.n_token_ids
        self.device = self.trunk.tok_embeddings.weight.device
        if compile and self.device.type != "cuda":
            raise InputError(f"compile=True needs a CUDA model (this one is on {self.device})")
        self._caches: dict[tuple[int, int], KVCache] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}  # persistent copies of the decode step's media state
        self.compiled = compile
        self._decode, self._prefill, self._encoders = decode_one, prefill, {}
        if compile:
            # "reduce-overhead" (CUDA graphs) plus coordinate-descent tuning of the generated kernels, for this
            # function only (options, unlike torch._inductor.config, are not global).
            self._decode = torch.compile(decode_one, fullgraph=True,
                                         options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})
            # Symbolic lengths (no CUDA graphs): one graph serves every prompt length and the many small kernels of
            # an eager forward are fused; the prefill dominates the time to the first token.
            self._prefill = torch.compile(prefill, dynamic=True)
            # Media encoders run once per request on fixed shapes: compiled, they fuse their many small kernels.
            self._encoders = {name: torch.compile(module) for name, module in model.encoders().items()}

    def _cache(self, batch_size: int, needed: int) -> KVCache:
        length = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
        key = (batch_size, length)
        if key not in self._caches:
            self._caches.clear()  # one live cache at a time: memory matters more than a rare re-allocation
            self._caches[key] = KVCache.for_model(self.trunk, batch_size, length)
            if self.compiled:
                self._caches[key].mark_static()
        return self._caches[key]

    def _check(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        vocab = self.vocab_limit
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= vocab:
                raise InputError(f"prompt {i} has token ids outside [0, {vocab}): {min(p)}..{max(p)}")
        longest = max(len(p) for p in prompts)
        limit = self.trunk.config.max_seq_len
        if longest >= limit:
            raise InputError(f"the prompt of {longest} tokens leaves no room for an answer in the model's context of "
                             f"{limit} tokens; shorten it")

    def _persistent(self, state: MediaState) -> MediaState:
        """The decode state's tensors copied into buffers that persist across requests: CUDA graphs then read them
        in place instead of copying them at every step (~200 MB of image K/V for 11B with one 4-tile image)."""
        index = itertools.count()

        def copy(t: torch.Tensor) -> torch.Tensor:
            key = (next(index), t.shape, t.dtype)
            if key not in self._buffers:
                self._buffers = {k: v for k, v in self._buffers.items() if k[0] != key[0]}
                self._buffers[key] = torch.empty_like(t)
                torch._dynamo.mark_static_address(self._buffers[key])
            return self._buffers[key].copy_(t)

        return state.map_tensors(copy)

    @torch.inference_mode()
    def stream_steps(self, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                     stop_tokens: Sequence[int] = (), media: Media | None = None,
                     taps: Sequence[int] = ()) -> Iterator[Emitted]:
        """Yield, per step, each row's new token (None once it has stopped; a stop token is not yielded) and the
        requested taps (`MMLlama.step`) of the position that chose it.

        Args:
            prompts: token ids per row (left-padded here; the result equals generating each prompt alone).
            media: the batch's media (`mm_llama.media.Media`), encoded once; keys/values computed once.
            taps: layer counts whose hidden states to yield with each token (e.g. (16,) for the TTS head).
        """
        self._check(prompts)
        B, longest = len(prompts), max(len(p) for p in prompts)
        # max_new_tokens is a maximum: the answer is cut where the context ends.
        room = self.trunk.config.max_seq_len - longest
        sampling = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room))
        cache = self._cache(B, longest + sampling.max_new_tokens)
        dev = self.device
        taps = tuple(taps)
        # Inputs go up without waiting for the GPU (pinned, non-blocking): with media, the host queues the encoders,
        # the keys/values and the prefill back to back, so the time to the first token is the GPU's alone.
        pads = [longest - len(p) for p in prompts]
        first_slot = tensor_to_device(pads, dev)
        padded = [[0] * pad + list(p) for pad, p in zip(pads, prompts, strict=True)]
        tokens = tensor_to_device(padded, dev)
        positions = (torch.arange(longest, device=dev)[None, :] - first_slot[:, None]).clamp(min=0)  # (B, T)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(sampling.seed)
        state = step_state = None
        if media is not None:  # the media state is built from the padded prompts (pads see no media), on the host
            state = self.model.prepare(padded, media.to(dev), left_pad=pads, for_decoding=True,
                                       encoders=self._encoders)
            step_state = state.for_decode()
            if self.compiled:
                step_state = self._persistent(step_state)

        out = self._prefill(self.model, tokens, positions, first_slot, cache, state, taps)
        next_tokens, next_taps = sample(out.logits[:, -1], sampling, generator), out.taps
        decode_slots = torch.arange(longest, longest + sampling.max_new_tokens, device=dev)
        to_host = _HostCopy(B, dev)
        stops = set(stop_tokens)
        done = [False] * B
        for step in range(sampling.max_new_tokens):
            to_host.start(next_tokens)
            emitted_taps = next_taps
            if step < sampling.max_new_tokens - 1:
                # Queue the next step before waiting for this token on the host: the GPU never idles while Python
                # streams, checks stops and launches (a step past a stop token is computed and dropped).
                cache_pos = decode_slots[step : step + 1]
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                with sdpa_kernel(DECODE_SDPA_BACKENDS):
                    out = self._decode(self.model, next_tokens[:, None], cache_pos, first_slot, cache, step_state,
                                       taps)
                next_tokens = sample(out.logits[:, -1], sampling, generator)
                # CUDA graphs overwrite their outputs at the next replay: taps leave the graph's memory now.
                next_taps = tuple(t.clone() for t in out.taps) if self.compiled else out.taps
            ids = to_host.wait()
            row_tokens: list[int | None] = []
            for b in range(B):
                done[b] = done[b] or ids[b] in stops
                row_tokens.append(None if done[b] else ids[b])
            if all(done):
                return
            yield Emitted(row_tokens, emitted_taps)

    def stream_batch(self, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                     stop_tokens: Sequence[int] = (), media: Media | None = None) -> Iterator[list[int | None]]:
        """`stream_steps` without taps: per step, each row's new token (None once it has stopped)."""
        for emitted in self.stream_steps(prompts, sampling, stop_tokens, media):
            yield emitted.tokens

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                 stop_tokens: Sequence[int] = (), media: Media | None = None) -> list[list[int]]:
        """New tokens of each prompt (stop token excluded)."""
        out: list[list[int]] = [[] for _ in prompts]
        for row_tokens in self.stream_batch(prompts, sampling, stop_tokens, media):
            for b, t in enumerate(row_tokens):
                if t is not None:
                    out[b].append(t)
        return out

    def stream_text(self, tokenizer: Tokenizer, prompt: Sequence[int], sampling: Sampling = Sampling(),
                    stop_tokens: Sequence[int] | None = None, media: Media | None = None) -> Iterator[str]:
        """Yield text pieces of one prompt's answer as they are generated (UTF-8 split across tokens is held back)."""
        decoder = StreamDecoder(tokenizer)
        stops = tokenizer.stop_tokens if stop_tokens is None else stop_tokens
        for (token,) in self.stream_batch([prompt], sampling, stops, media):
            if piece := decoder.push(token):
                yield piece
        if rest := decoder.flush():
            yield rest


def generate(model: Composed, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = (), media: Media | None = None) -> list[list[int]]:
    """One-off generation (see `Generator` to reuse caches and compiled graphs across calls)."""
    return Generator(model).generate(prompts, sampling, stop_tokens, media)
