"""`MMLlama`: the frozen trunk composed with its parts, and `MMConfig`, the one description every builder, loader and
checkpoint uses.

The model owns the layer loop (STYLE rule 4): `step` iterates the trunk's layers itself, runs each gated
cross-attention adapter's blocks just before the trunk layers they are scheduled for, splices embeddings into the
token stream, and can hand out the hidden state after any layers ("taps": the TTS head reads layer 16). Nothing inside
the trunk is wrapped, hooked or patched. `forward(tokens, media)` is what training calls: the whole media path runs
inside it (so FSDP gathers every weight inside the root's forward). Generation calls `prepare` once per request and
`step` per prefill/decode step.

A medium plugs in as a field of `MMConfig` and `Media`, its modules here (named after the field: the name is also
its part in mm-llama's checkpoint format), and a few lines in `prepare`; the loop, generation and checkpoints are
generic. Text-only input skips every adapter, so its logits are bit-identical to the trunk's.

Shapes: B batch, T text positions, D model dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from adapters.cross_attention import CrossAttentionConfig, CrossAttentionInputs, GatedCrossAttention
from adapters.image import VisionProjection, encode_images, image_inputs
from adapters.media_tokens import N_MEDIA_ROWS, MediaTokenEmbedding
from adapters.speech import SpeechAdapter, SpeechAdapterConfig, speech_positions
from adapters.video import VideoAdapter, VideoAdapterConfig, encode_videos, video_inputs
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from encoders.vision import VisionConfig, VisionEncoder
from mm_llama.api import Assistant
from mm_llama.errors import ConfigError, InputError
from mm_llama.llama import KVCacheLike, Llama, LlamaConfig
from mm_llama.media import EmbeddingSpans, Media, MediaState, Splice

# Fields that choose Meta's or transformers' semantics when a checkpoint is loaded (`MMConfig.with_semantics`); the
# weights are the same either way, so mm-llama's checkpoint format never stores them.
SEMANTICS_FIELDS = {"vision": ("intermediate_mode", "hf_padding_images"), "image_adapter": ("mask_attention_rows",)}
# Positions a speech span of the longest utterance must leave in the context, for the prompt and the answer.
_PROMPT_ROOM = 64
# Fields that only set freshly initialised weights; a checkpoint's weights replace them, so it never stores them either.
INIT_ONLY_FIELDS = {"image_adapter": ("gate_init",), "video_adapter": ("gate_init",)}


def stored_part_config(name: str, config) -> dict:
    """Part `name`'s config dataclass as mm-llama's checkpoint format stores it: plain values, no semantics fields
    and no init-only fields."""
    from mm_llama.config import to_dict

    left_out = SEMANTICS_FIELDS.get(name, ()) + INIT_ONLY_FIELDS.get(name, ())
    return {k: v for k, v in to_dict(config).items() if k not in left_out}


@dataclass(kw_only=True)
class MMConfig:
    """The composed model: the trunk and each optional part.

    A part's field name is also the name of its module in `MMLlama` and of its entry in mm-llama's checkpoint
    format. The image encoder (`vision`) and the image adapter (`image_adapter`) come together; the video adapter
    (`video_adapter`) builds on both: its frames go through the image encoder, its blocks sit before image blocks.
    The speech encoder (`speech_encoder`) and its adapter (`speech_adapter`) come together, with or without the
    others: their embeddings enter the token stream.
    """

    trunk: LlamaConfig
    vision: VisionConfig | None = None
    image_adapter: CrossAttentionConfig | None = None
    video_adapter: VideoAdapterConfig | None = None
    speech_encoder: SpeechEncoderConfig | None = None
    speech_adapter: SpeechAdapterConfig | None = None

    def __post_init__(self) -> None:
        if (self.vision is None) != (self.image_adapter is None):
            raise ConfigError("MMConfig: 'vision' (the image encoder) and 'image_adapter' (its cross-attention "
                              "adapter) come together; give both or neither")
        if self.video_adapter is not None and self.image_adapter is None:
            raise ConfigError("MMConfig: 'video_adapter' needs 'vision' and 'image_adapter' (its frames go through "
                              "the image encoder and its blocks are placed before image cross-attention blocks)")
        if (self.speech_encoder is None) != (self.speech_adapter is None):
            raise ConfigError("MMConfig: 'speech_encoder' (the conformer) and 'speech_adapter' come together; give "
                              "both or neither")
        if self.speech_encoder is not None and self.speech_adapter.in_dim != self.speech_encoder.dim:
            raise ConfigError(f"MMConfig: speech_adapter.in_dim ({self.speech_adapter.in_dim}) must equal the speech "
                              f"encoder's dim ({self.speech_encoder.dim})")
        if self.speech_adapter is not None:  # one span of the longest utterance must leave room for a prompt
            span = int(speech_positions(torch.tensor(int(self.speech_adapter.max_seconds * 100)),
                                        self.speech_encoder.stack, self.speech_adapter)) + 2  # and its markers
            if span + _PROMPT_ROOM > self.trunk.max_seq_len:
                raise ConfigError(f"MMConfig: a speech span of speech_adapter.max_seconds "
                                  f"({self.speech_adapter.max_seconds:g} s) takes {span} positions, leaving under "
                                  f"{_PROMPT_ROOM} of the trunk's context ({self.trunk.max_seq_len}) for the prompt "
                                  "and the answer; lower max_seconds (long audio is then cut into more chunks)")

    @property
    def has_media(self) -> bool:
        """Whether any medium is attached (then the media-token rows exist)."""
        return self.image_adapter is not None or self.speech_adapter is not None

    def with_semantics(self, hf_compat: bool) -> MMConfig:
        """The same model computing Meta's reference semantics (default) or transformers' (`hf_compat`): the ViT's
        intermediate feature i is the input (Meta) or output (HF >= 4.56) of block i; rows without an image are
        zeroed on both cross-attention branches (Meta) or only the MLP's (HF); HF's padding-image tile."""
        if self.vision is None:
            return self
        return replace(self, vision=replace(self.vision, intermediate_mode="output" if hf_compat else "input",
                                            hf_padding_images=hf_compat),
                       image_adapter=replace(self.image_adapter, mask_attention_rows=not hf_compat))

    def part_configs(self) -> dict[str, dict]:
        """Each present part's config as stored by mm-llama's checkpoint format (semantics fields left out)."""
        return {f.name: stored_part_config(f.name, getattr(self, f.name)) for f in fields(self)
                if f.name != "trunk" and getattr(self, f.name) is not None}

    @classmethod
    def from_parts(cls, trunk: LlamaConfig, parts: Mapping[str, Mapping], *, source: str) -> MMConfig:
        """Inverse of `part_configs`: `parts` maps part names to stored config dicts (strictly checked)."""
        from mm_llama.config import from_dict

        known = {f.name for f in fields(cls)} - {"trunk"}
        if unknown := sorted(set(parts) - known):
            raise ConfigError(f"{source}: unknown part config(s) {unknown}; parts with a config: {sorted(known)}")
        return from_dict(cls, {"trunk": trunk, **parts}, source=source)


class Step(NamedTuple):
    """What one pass of the layer loop returns."""

    logits: torch.Tensor  # (B, T, V) fp32 (T = 1 with last_only)
    taps: tuple[torch.Tensor, ...]  # the hidden state after each requested number of layers, (B, T, D) each


class MMLlama(nn.Module):
    """Trunk + media-token rows + the parts `config` names (an image encoder, its projection and its adapter).

    Args:
        config: the composed model.
        trunk: an existing trunk to build around (e.g. a loaded, frozen one); its config must be `config.trunk`.
            Default: a new one.
    """

    def __init__(self, config: MMConfig, *, trunk: Llama | None = None):
        super().__init__()
        if trunk is not None and trunk.config != config.trunk:
            raise ConfigError(f"the trunk's config differs from MMConfig.trunk: {trunk.config} vs {config.trunk}")
        self.config = config
        t = config.trunk
        self.trunk = trunk if trunk is not None else Llama(t)
        self.media = MediaTokenEmbedding(t.dim, t.vocab_size) if config.has_media else None
        self.vision = self.vision_projection = self.image_adapter = self.video_adapter = None
        self.speech_encoder = self.speech_adapter = None
        if config.vision is not None:
            self.vision = VisionEncoder(config.vision)
            # Multi-layer ViT features (7680-d for ViT-H) -> the trunk's width, with a bias (Llama 3.2's projection;
            # plus patch positions with VisionConfig.patch_position_features).
            self.vision_projection = VisionProjection(config.vision, t.dim)
            self.image_adapter = GatedCrossAttention(t, config.image_adapter)
        if config.video_adapter is not None:
            self.video_adapter = VideoAdapter(t, config.video_adapter, self.image_adapter.schedule,
                                              config.vision.max_tiles * config.vision.tokens_per_tile)
        if config.speech_encoder is not None:
            self.speech_encoder = SpeechEncoder(config.speech_encoder)
            self.speech_adapter = SpeechAdapter(config.speech_adapter, t.dim)
        # Media rows in the tokenizer's order (`MEDIA_TOKENS`): 128256 … for Llama 3.
        self.image_id, self.video_id = t.vocab_size, t.vocab_size + 1  # <|image|>, <|video|>
        self.speech_start_id, self.speech_end_id, self.speech_id = (t.vocab_size + i for i in (2, 3, 4))
        self.source: Path | None = None  # the directory `from_pretrained` read (where `ask` finds tokenizer.model)

    @classmethod
    def from_pretrained(cls, path, *, hf_compat: bool = False, dtype: torch.dtype | None = torch.bfloat16,
                        device: torch.device | str = "cpu") -> MMLlama:
        """Load any checkpoint directory, strictly: a Llama 3 trunk (Meta or Hugging Face), Llama 3.2 Vision
        (Hugging Face Mllama, Meta with `vision_*` fields and model-parallel shards), or mm-llama's own format (a
        trunk with any parts). See `mm_llama.checkpoints.load_mmllama`.

        Args:
            hf_compat: compute transformers' semantics instead of Meta's (see `MMConfig.with_semantics`).
            dtype: parameter dtype (None keeps the checkpoint's); device: where the weights go.
        """
        from mm_llama.checkpoints import load_mmllama

        return load_mmllama(path, hf_compat=hf_compat, dtype=dtype, device=device)

    # --- Conveniences over `mm_llama.api.Assistant` (a new one per call, with the checkpoint's tokenizer) ---------

    def ask(self, question: str | None = None, *, image=None, images: Sequence | None = None, video=None,
            audio=None, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
            top_k: int | None = None, top_p: float = 1.0, seed: int | None = None) -> str:
        """The answer to `question` (or to the question spoken in `audio`), about `image` or `images` and `video` if
        given; greedy by default. The tokenizer is the checkpoint directory's; for a tokenizer of your own, compiled
        decoding or many questions, use `mm_llama.api.Assistant`, whose `ask_stream` documents the arguments."""
        return "".join(self.ask_stream(question, image=image, images=images, video=video, audio=audio, system=system,
                                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed))

    def ask_stream(self, question: str | None = None, *, image=None, images: Sequence | None = None, video=None,
                   audio=None, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """`ask`, streamed as text pieces."""
        return Assistant.for_model(self).ask_stream(question, image=image, images=images, video=video, audio=audio,
                                                    system=system, max_new_tokens=max_new_tokens,
                                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def transcribe(self, audio, *, language: str = "English", max_new_tokens: int = 256, batch_size: int = 8) -> str:
        """What is said in `audio` (a path, bytes or `(waveform, sample_rate)`), in `language`: the paper's
        recognition prompt. Long audio is transcribed chunk by chunk, `batch_size` chunks at a time
        (`Assistant.transcribe`)."""
        return Assistant.for_model(self).transcribe(audio, language=language, max_new_tokens=max_new_tokens,
                                                    batch_size=batch_size)

    # --- What generation and checkpoints use -----------------------------------------------------------------------

    @property
    def n_token_ids(self) -> int:
        """Token ids the model reads: the vocabulary, and the media rows above it when a medium is attached."""
        return self.config.trunk.vocab_size + (N_MEDIA_ROWS if self.media is not None else 0)

    def parts(self) -> dict[str, nn.Module]:
        """Every part but the trunk, by name: one entry each in mm-llama's checkpoint format (whose writer groups a
        state dict by the same top-level names, `checkpoints.ours.split_parts`)."""
        return {name: module for name, module in self.named_children() if name != "trunk"}

    def encoders(self) -> dict[str, nn.Module]:
        """The media encoders, which run once per request on fixed shapes: what generation may compile. (The speech
        adapter is one too: the encoder's frames pass through it alone.)"""
        parts = {"vision": self.vision, "speech_encoder": self.speech_encoder, "speech_adapter": self.speech_adapter}
        return {name: part for name, part in parts.items() if part is not None}

    def _cross_adapters(self) -> list[tuple[str, GatedCrossAttention]]:
        """The gated cross-attention adapters in the order their blocks run before the same trunk layer: a video
        block before the image block it is placed with (paper §7.2)."""
        return [(name, adapter) for name, adapter in (("video_adapter", self.video_adapter),
                                                      ("image_adapter", self.image_adapter)) if adapter is not None]

    def prepare(self, tokens: torch.Tensor | Sequence[Sequence[int]], media: Media | None, *,
                left_pad: Sequence[int] | None = None, for_decoding: bool = False,
                encoders: Mapping[str, nn.Module] | None = None) -> MediaState | None:
        """Encode `media` and build what the layer loop reads for `tokens` (B, T).

        Args:
            tokens: the ids, read on the host (a CUDA tensor makes the host wait for the GPU; lists or a CPU tensor
                let it queue the encoders' work without waiting).
            left_pad: pad tokens in front of each row (generation left-pads; spliced spans move with it).
            for_decoding: compute each adapter's keys/values here, once, for a prefill and many decode steps;
                default: each block computes its own inside its forward (training).
            encoders: stand-ins for `encoders()` with the same signature (e.g. compiled ones).
        Returns:
            The state, or None without media.
        """
        if media is None:
            return None
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(row) for row in tokens]
        encoders = {**self.encoders(), **(encoders or {})}
        state = MediaState()
        if media.images is not None:
            if self.vision is None:
                raise InputError("this model has no image encoder: it answers text only")
            projected = encode_images(media.images, encoders["vision"], self.vision_projection,
                                      hf_padding_images=self.config.vision.hf_padding_images)
            state.cross["image_adapter"] = image_inputs(rows, media.images, projected, image_id=self.image_id,
                                                        adapter=self.image_adapter if for_decoding else None)
        if media.videos is not None and any(media.videos.n_videos):  # a batch with no clip skips the video blocks
            if self.video_adapter is None:
                raise InputError("this model has no video adapter: it answers about images and text only"
                                 if self.vision is not None else "this model has no video adapter: it answers text "
                                 "only")
            effective = encode_videos(media.videos, encoders["vision"], self.vision_projection,
                                      self.video_adapter.aggregator)
            state.cross["video_adapter"] = video_inputs(
                rows, media.videos, effective, self.config.video_adapter.n_moments, video_id=self.video_id,
                adapter=self.video_adapter if for_decoding else None)
        spans = media.embeddings
        if media.speech is not None:
            speech = self._speech_spans(rows, media.speech, left_pad, encoders)
            spans = speech if spans is None else EmbeddingSpans(spans.embeddings + speech.embeddings,
                                                                spans.samples + speech.samples,
                                                                spans.starts + speech.starts)
        if spans is not None:
            state.splice = Splice.resolve(spans, len(rows), len(rows[0]), self.config.trunk.dim, left_pad)
        return state

    def speech_positions(self, mel_lengths: Sequence[int] | torch.Tensor) -> list[int]:
        """Token positions of utterances of `mel_lengths` mel frames: the `<|speech|>` tokens each needs."""
        if self.speech_adapter is None:
            raise InputError("this model has no speech encoder: it does not take audio")
        return speech_positions(torch.as_tensor(mel_lengths), self.config.speech_encoder.stack,
                                self.config.speech_adapter).tolist()

    def _speech_spans(self, rows: list[list[int]], utterances, left_pad: Sequence[int] | None,
                      encoders: Mapping[str, nn.Module]) -> EmbeddingSpans:
        """Encode `utterances` (`encoders.utterances.Utterances`) with `encoders` (as `prepare`'s) and place utterance
        k's embeddings in the k-th `<|speech_start|>` span of the batch (row by row, left to right), which must hold
        exactly its positions."""
        if self.speech_adapter is None:
            raise InputError("this model has no speech encoder: it does not take audio")
        need = self.speech_positions(utterances.host_lengths)
        samples, starts = [], []
        for b, row in enumerate(rows):
            for t, token in enumerate(row):
                if token != self.speech_start_id:
                    continue
                k = len(starts)
                if k >= len(need):
                    raise InputError(f"the tokens hold more <|speech_start|> spans than the {len(need)} utterance(s)")
                n = 0
                while t + 1 + n < len(row) and row[t + 1 + n] == self.speech_id:
                    n += 1
                if n != need[k] or (t + 1 + n < len(row) and row[t + 1 + n] != self.speech_end_id):
                    after = ("the end of the row" if t + 1 + n == len(row) else "<|speech_end|>"
                             if row[t + 1 + n] == self.speech_end_id else f"token {row[t + 1 + n]}")
                    raise InputError(f"speech span {k} (row {b}) holds {n} <|speech|> positions then {after}; its "
                                     f"utterance needs {need[k]} then <|speech_end|>")
                samples.append(b)
                starts.append(t + 1 - (left_pad[b] if left_pad is not None else 0))
        if len(starts) != len(need):
            raise InputError(f"{len(need)} utterance(s) but {len(starts)} <|speech_start|> span(s) in the tokens")
        dtype = self.speech_encoder.input_projection.weight.dtype  # features are fp32; the weights may be bf16
        frames, lengths = encoders["speech_encoder"](utterances.mel.to(dtype), utterances.lengths)
        embeddings, _ = encoders["speech_adapter"](frames, lengths)  # (N, P, D)
        return EmbeddingSpans([embeddings[k, :n] for k, n in enumerate(need)], samples, starts)

    def embed(self, tokens: torch.Tensor, splice: Splice | None = None) -> torch.Tensor:
        """(B, T) ids, media ids included -> (B, T, D), with `splice`'s embeddings in place. (Ids are checked by
        the callers that take user input, so that this stays free of host synchronisation.)"""
        h = self.media(tokens, self.trunk.tok_embeddings) if self.media is not None else self.trunk.embed(tokens)
        return splice.place(h) if splice is not None else h

    def forward(self, tokens: torch.Tensor, media: Media | None = None, *, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: KVCacheLike | None = None,
                cache_pos: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits for `tokens` (B, T) attending to `media`, encoded inside this call (the training path).

        Args:
            media: the batch's media, or None for text (the adapters are then skipped: the trunk's logits exactly).
            positions, mask, cache, cache_pos, last_only: as for `step`.
        Returns:
            (B, T, V) fp32 logits.
        """
        return self.step(tokens, self.prepare(tokens, media), positions=positions, mask=mask, cache=cache,
                         cache_pos=cache_pos, last_only=last_only).logits

    def step(self, tokens: torch.Tensor, state: MediaState | None = None, *, positions: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, cache: KVCacheLike | None = None,
             cache_pos: torch.Tensor | None = None, last_only: bool = False, taps: Sequence[int] = ()) -> Step:
        """The layer loop: one pass over `tokens` (B, T) with a prepared media state.

        Args:
            state: from `prepare` (None: text only).
            positions: RoPE positions, (T,) or (B, T); default 0..T-1.
            mask: boolean (B|1, 1, T, S), True = may attend; default causal (required with a cache).
            cache, cache_pos: KV cache and the (T,) slots the new keys/values go to.
            last_only: logits and taps of the last position only (what a prefill needs).
            taps: numbers of trunk layers after which to return the hidden state: 0 is the embeddings (spliced
                ones included), n_layers the last layer's output before the final norm. Cross-attention blocks
                scheduled before layer i run after tap i.
        Returns:
            `Step(logits, taps)`, the taps in the order asked.
        """
        n = len(self.trunk.layers)
        if bad := [i for i in taps if not (isinstance(i, int) and 0 <= i <= n)]:
            raise InputError(f"taps {bad} are not layer counts in 0..{n}")
        if cache is not None and (mask is None or cache_pos is None):
            raise ValueError("a KV cache needs an explicit mask and cache_pos (see generate.py)")
        h = self.embed(tokens, state.splice if state is not None else None)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        rope = self.trunk.rope(positions)
        before = self._blocks_before(state)
        kept = {0: h} if 0 in taps else {}
        for i, layer in enumerate(self.trunk.layers):
            for block in before.get(i, ()):
                h = block(h)
            h = layer(h, rope, mask, cache, cache_pos)
            if i + 1 in taps:
                kept[i + 1] = h
        for block in before.get(n, ()):  # blocks scheduled after the last trunk layer (HF allows any placement)
            h = block(h)
        if last_only:
            h, kept = h[:, -1:], {i: x[:, -1:] for i, x in kept.items()}
        return Step(self.trunk.head(h), tuple(kept[i] for i in taps))

    def _blocks_before(self, state: MediaState | None) -> dict[int, list[Callable[[torch.Tensor], torch.Tensor]]]:
        """Trunk layer index -> the cross-attention blocks to run just before it, bound to their inputs, in run
        order. Adapters without inputs in `state` are skipped entirely."""
        before: dict[int, list] = {}
        if state is None:
            return before
        for name, adapter in self._cross_adapters():
            inputs = state.cross.get(name)
            if inputs is None:
                continue
            for j, (layer, block) in enumerate(zip(adapter.schedule, adapter.cross_attention_layers, strict=True)):
                before.setdefault(layer, []).append(_bound(block, inputs, j))
        return before


def _bound(block: nn.Module, inputs: CrossAttentionInputs, j: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Block j of an adapter with its inputs: hidden states in, hidden states out."""
    return lambda h: block(h, inputs.mask, inputs.rows, **inputs.block_kwargs(j))
