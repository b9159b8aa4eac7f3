"""Text generation for the trunk: a preallocated KV cache, separate prefill and decode steps, sampling, streaming.

Batches of prompts with different lengths are left-padded: every row writes the same cache slot at each step, so
one decode step serves the whole batch, while each row keeps its own RoPE positions (0 at its first real token) and
its own mask (pad slots are never attended to). The result equals generating each prompt alone.

With `compile=True` (GPU) the decode step is compiled once with CUDA graphs (gpt-fast style): the cache tensors are
marked static, and every step has the same shapes. The cache length is rounded up to a bucket so that calls with
similar lengths reuse the compiled graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from adapters.cross_attention import tile_visibility
from adapters.media_tokens import N_MEDIA_ROWS
from mm_llama.errors import InputError
from mm_llama.llama import Llama
from mm_llama.tokenizer import StreamDecoder, Tokenizer
from mm_llama.transfer import tensor_to_device

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
    """How to pick each next token. temperature 0 means greedy (the default)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be a positive integer or None, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


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


def _decode_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor,
                 first_slot: torch.Tensor, cache: KVCache, cross: dict) -> torch.Tensor:
    """One token per row: (B, 1) ids at slot cache_pos (1,) -> (B, V) logits. `cross`: image inputs of MMLlama."""
    mask = attention_mask(cache_pos, first_slot, cache.max_len)
    return model(tokens, positions=positions, mask=mask, cache=cache, cache_pos=cache_pos, **cross)[:, -1]


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


class Generator:
    """Generates from a `Llama` or an `MMLlama`, reusing KV caches (and compiled decode graphs) across calls.

    Args:
        model: the trunk, or the composed model, already on its device and dtype.
        compile: compile the decode step with CUDA graphs (GPU only; the first call per cache bucket compiles).
    """

    def __init__(self, model: nn.Module, *, compile: bool = False):
        self.model = model
        self.trunk: Llama = getattr(model, "trunk", model)
        self.vocab_limit = self.trunk.config.vocab_size + (N_MEDIA_ROWS if model is not self.trunk else 0)
        self.device = self.trunk.tok_embeddings.weight.device
        if compile and self.device.type != "cuda":
            raise InputError(f"compile=True needs a CUDA model (this one is on {self.device})")
        self._caches: dict[tuple[int, int], KVCache] = {}
        self._decode = _decode_step
        if compile:
            # "reduce-overhead" (CUDA graphs) plus coordinate-descent tuning of the generated kernels, for this
            # function only (options, unlike torch._inductor.config, are not global).
            self._decode = torch.compile(_decode_step, fullgraph=True,
                                         options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})
        self.compiled = compile
        # Prefill: compiled with symbolic lengths (no CUDA graphs), so one graph serves every prompt length and the
        # many small kernels of an eager forward are fused; it dominates the time to the first token.
        self._prefill = torch.compile(model, dynamic=True) if compile else model
        # The image encoder runs once per request on fixed tile shapes: compiled, it fuses its many small kernels.
        vision = getattr(model, "vision", None)
        self.vision_encoder = torch.compile(vision) if compile and vision is not None else vision

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, n_images: list[int]):
        """`MMLlama.encode_images` with this generator's (possibly compiled) image encoder."""
        return self.model.encode_images(pixel_values, aspect_ratio_ids, n_images, encoder=self.vision_encoder)

    def _cache(self, batch_size: int, needed: int) -> KVCache:
        length = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
        key = (batch_size, length)
        if key not in self._caches:
            self._caches.clear()  # one live cache at a time: memory matters more than a rare re-allocation
            self._caches[key] = KVCache.for_model(self.trunk, batch_size, length)
            if self.compiled:
                self._caches[key].mark_static()
        return self._caches[key]

    def _check(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        vocab = self.vocab_limit
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= vocab:
                raise InputError(f"prompt {i} has token ids outside [0, {vocab}): {min(p)}..{max(p)}")
        longest = max(len(p) for p in prompts)
        limit = self.trunk.config.max_seq_len
        if longest + sampling.max_new_tokens > limit:
            raise InputError(f"prompt of {longest} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                             f"model's context of {limit} tokens")

    def _static_cross(self, cross: dict) -> dict:
        """Image K/V copied into buffers that persist across requests: CUDA graphs then read them in place
        instead of copying ~200 MB per step (11B, one 4-tile image)."""
        kv = cross["cross_kv"]
        key = tuple(k.shape for k, _ in kv)
        if getattr(self, "_cross_key", None) != key:
            self._cross_buffers = [(torch.empty_like(k), torch.empty_like(v)) for k, v in kv]
            for k, v in self._cross_buffers:
                torch._dynamo.mark_static_address(k)
                torch._dynamo.mark_static_address(v)
            self._cross_key = key
        for (kb, vb), (k, v) in zip(self._cross_buffers, kv, strict=True):
            kb.copy_(k)
            vb.copy_(v)
        return {**cross, "cross_kv": self._cross_buffers}

    @torch.inference_mode()
    def stream_batch(self, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                     stop_tokens: Sequence[int] = (), vision=None) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of each row (None once a row has stopped). A stop token is not yielded.

        `vision` (`mm_llama.model.VisionInputs`, MMLlama only): the batch's images; their K/V are computed once.
        """
        self._check(prompts, sampling)
        B, longest = len(prompts), max(len(p) for p in prompts)
        cache = self._cache(B, longest + sampling.max_new_tokens)
        dev = self.device
        # Inputs go up without waiting for the GPU (pinned, non-blocking): with an image, the host queues the image
        # K/V and the prefill while the encoder still runs, so the time to the first token is the GPU's alone.
        first_slot = tensor_to_device([longest - len(p) for p in prompts], dev)
        padded = [[0] * (longest - len(p)) + list(p) for p in prompts]
        tokens = tensor_to_device(padded, dev)
        slots = torch.arange(longest, device=dev)
        positions = (slots[None, :] - first_slot[:, None]).clamp(min=0)  # (B, T): 0 at each row's first token
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(sampling.seed)

        cross, step_cross = {}, {}
        if vision is not None:
            # Masks from the padded prompts (pads see no image), made on the host.
            cross = self.model.cross_inputs(torch.tensor(padded), vision)
            if self.compiled:
                cross = self._static_cross(cross)
            # New tokens see what the prompt's last token sees (Meta's and HF's rule). When that is every tile
            # (one image with all its tiles real, the common case), no mask: SDPA may take a fused kernel.
            seen = tile_visibility(padded, self.model.image_id, vision.n_images, vision.tile_mask)  # (B, T, I, Tiles)
            sees_all = bool(seen[:, -1].all())
            step_cross = {**cross, "cross_mask": None if sees_all else cross["cross_mask"][:, :, -1:],
                          "rows": cross["rows"][:, -1:]}

        # Prefill: the whole (padded) prompt at once; logits of the last position only.
        mask = attention_mask(slots, first_slot, cache.max_len)
        logits = self._prefill(tokens, positions=positions, mask=mask, cache=cache, cache_pos=slots, last_only=True,
                               **cross)
        next_tokens = sample(logits[:, -1], sampling, generator)
        decode_slots = torch.arange(longest, longest + sampling.max_new_tokens, device=dev)
        to_host = _HostCopy(B, dev)
        stops = set(stop_tokens)
        done = [False] * B
        for step in range(sampling.max_new_tokens):
            to_host.start(next_tokens)
            if step < sampling.max_new_tokens - 1:
                # Queue the next step before waiting for this token on the host: the GPU never idles while Python
                # streams, checks stops and launches (a step past a stop token is computed and dropped).
                cache_pos = decode_slots[step : step + 1]
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                with sdpa_kernel(DECODE_SDPA_BACKENDS):
                    logits = self._decode(self.model, next_tokens[:, None], (cache_pos - first_slot)[:, None],
                                          cache_pos, first_slot, cache, step_cross)
                next_tokens = sample(logits, sampling, generator)
            ids = to_host.wait()
            row_tokens: list[int | None] = []
            for b in range(B):
                done[b] = done[b] or ids[b] in stops
                row_tokens.append(None if done[b] else ids[b])
            if all(done):
                return
            yield row_tokens

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                 stop_tokens: Sequence[int] = (), vision=None) -> list[list[int]]:
        """New tokens of each prompt (stop token excluded)."""
        out: list[list[int]] = [[] for _ in prompts]
        for row_tokens in self.stream_batch(prompts, sampling, stop_tokens, vision):
            for b, t in enumerate(row_tokens):
                if t is not None:
                    out[b].append(t)
        return out

    def stream_text(self, tokenizer: Tokenizer, prompt: Sequence[int], sampling: Sampling = Sampling(),
                    stop_tokens: Sequence[int] | None = None, vision=None) -> Iterator[str]:
        """Yield text pieces of one prompt's answer as they are generated (UTF-8 split across tokens is held back)."""
        decoder = StreamDecoder(tokenizer)
        stops = tokenizer.stop_tokens if stop_tokens is None else stop_tokens
        for (token,) in self.stream_batch([prompt], sampling, stops, vision):
            if piece := decoder.push(token):
                yield piece
        if rest := decoder.flush():
            yield rest


@torch.inference_mode()
def generate(model: Llama, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = ()) -> list[list[int]]:
    """One-off generation (see `Generator` to reuse caches and compiled graphs across calls)."""
    return Generator(model).generate(prompts, sampling, stop_tokens)
