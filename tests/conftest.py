"""Shared fixtures: tiny random Llama checkpoints in Hugging Face format, written by transformers itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
# The real Llama 3 tokenizer (sha256 82e9d319...): ../shared beside the checkout, or wherever the variable points.
LLAMA3_TOKENIZER = Path(os.environ.get("MM_LLAMA_LLAMA3_TOKENIZER", SHARED / "llama3" / "tokenizer.model"))


def llama3_tokenizer_path() -> Path:
    """The real Llama 3 tokenizer, read from ../shared (never copied into the project)."""
    if not LLAMA3_TOKENIZER.is_file():
        pytest.fail(f"the real Llama 3 tokenizer is expected at {LLAMA3_TOKENIZER} (../shared/llama3/ beside the "
                    "checkout, or set MM_LLAMA_LLAMA3_TOKENIZER)")
    return LLAMA3_TOKENIZER


def composed(trunk):
    """The text-only composed model around `trunk` (what generation runs)."""
    from mm_llama.model import MMConfig, MMLlama

    return MMLlama(MMConfig(trunk=trunk.config), trunk=trunk).eval()


def hf_llama_config(*, vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=176,
                    scaled_rope=True, tied=False, original_context=32, max_positions=512):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaled_rope:
        # A short original context so that positions of a few hundred tokens fall in every scaling band.
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": original_context}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate_size,
                       num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                       rms_norm_eps=1e-5, max_position_embeddings=max_positions, tie_word_embeddings=tied,
                       rope_parameters=rope)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with unit-scale activations (HF's 0.02 init makes logits nearly flat, which hides errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def make_hf_checkpoint(path: Path, seed: int = 0, **config_kwargs):
    """Write a random LlamaForCausalLM with transformers' own save_pretrained; returns the HF model (eval, fp32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = randomize_(LlamaForCausalLM(hf_llama_config(**config_kwargs)), seed).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """(directory, HF model) of a tiny GQA model with Llama 3.1 rope scaling and an untied head."""
    path = tmp_path / "hf"
    return path, make_hf_checkpoint(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """800 shapes-world text samples in 4 shards, with the world tokenizer synth writes (the `debug` vocabulary)."""
    from mm_llama.data.synth_text import synth_text

    out = tmp_path_factory.mktemp("text")
    synth_text(out, 800, seed=0, shard_size=200)
    return out


class Crash(Exception):
    """The process died (raised by `crash_after`)."""


def crash_after(stage, n_batches: int):
    """Make a training stage's data source die once `n_batches` have been taken: a process that died mid-run."""
    batches = stage.batches

    def limited(runtime, start):
        for i, batch in enumerate(batches(runtime, start), start=start):
            if i >= n_batches:
                raise Crash(f"killed after {n_batches} batches")
            yield batch

    stage.batches = limited
    return stage


def run_mm_llama(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `mm-llama` console script (the one next to this Python) as a user would, on the CPU."""
    script = Path(sys.executable).with_name("mm-llama")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mm_llama.cli"]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})


def make_video_model(path: Path, *, video: bool = True) -> Path:
    """A small random model with a video adapter (open gates: the clip matters) in mm-llama's format, with the shapes
    world's tokenizer: 4 trunk layers, the debug ViT at one 84-px tile, 2 image blocks, 4 frames in 2 groups; with
    `video` False, the same without the video adapter (an image model)."""
    import shutil

    from adapters.cross_attention import CrossAttentionConfig
    from adapters.video import VideoAdapterConfig
    from encoders.vision import VisionConfig
    from mm_llama.checkpoints import save_mmllama
    from mm_llama.data.world_tokenizer import WORLD_TOKENIZER
    from mm_llama.llama import LlamaConfig
    from mm_llama.model import MMConfig, MMLlama
    from mm_llama.tokenizer import Tokenizer

    vocab = Tokenizer.from_file(WORLD_TOKENIZER).n_words
    config = MMConfig(trunk=LlamaConfig.preset("debug", vocab_size=vocab, n_layers=4),
                      vision=VisionConfig.preset("debug", max_tiles=1, tile_size=84),
                      image_adapter=CrossAttentionConfig(n_layers=2),
                      video_adapter=VideoAdapterConfig(n_frames=4, group=2, gate_init=0.5) if video else None)
    torch.manual_seed(0)
    save_mmllama(randomize_(MMLlama(config), seed=1), path)
    shutil.copy(WORLD_TOKENIZER, path / "tokenizer.model")
    return path


def make_speech_model(path: Path, *, vision: bool = True, max_seconds: float = 4) -> Path:
    """A small random model with a speech encoder and adapter (debug sizes; utterances of at most `max_seconds` a
    span) in mm-llama's format, with the shapes world's tokenizer; with `vision`, the debug image encoder and 2 image
    blocks too."""
    import math
    import shutil

    from adapters.cross_attention import CrossAttentionConfig
    from adapters.speech import SpeechAdapterConfig
    from encoders.speech import SpeechEncoderConfig
    from encoders.vision import VisionConfig
    from mm_llama.checkpoints import save_mmllama
    from mm_llama.data.world_tokenizer import WORLD_TOKENIZER
    from mm_llama.llama import LlamaConfig
    from mm_llama.model import MMConfig, MMLlama
    from mm_llama.tokenizer import Tokenizer

    vocab = Tokenizer.from_file(WORLD_TOKENIZER).n_words
    # A context that holds a prompt and one longest utterance (12.5 positions a second, `MMLlama.speech_positions`).
    context = max(256, 128 + math.ceil(12.5 * max_seconds))
    config = MMConfig(trunk=LlamaConfig.preset("debug", vocab_size=vocab, n_layers=2, max_seq_len=context),
                      vision=VisionConfig.preset("debug", max_tiles=1, tile_size=84) if vision else None,
                      image_adapter=CrossAttentionConfig(n_layers=2) if vision else None,
                      speech_encoder=SpeechEncoderConfig.preset("debug"),
                      speech_adapter=SpeechAdapterConfig(in_dim=64, dim=64, n_heads=4, ffn_dim=128,
                                                        max_seconds=max_seconds))
    torch.manual_seed(0)
    save_mmllama(randomize_(MMLlama(config), seed=1), path)
    shutil.copy(WORLD_TOKENIZER, path / "tokenizer.model")
    return path


def espeak_wave(text: str, voice: str = "en-us") -> tuple:
    """`text` spoken by espeak-ng (in-process) as a (waveform, sample_rate) tuple."""
    from mm_llama.data.espeak import Espeak, Voice

    engine = Espeak()
    return engine.synth(text, Voice(voice)), engine.sample_rate


def make_clip(path: Path, seed: int) -> Path:
    """A random shapes-world clip of `seed`, rendered and encoded to mp4 at `path`."""
    import random

    from mm_llama.data.world_clips import random_clip
    from mm_llama.data.world_video import encode_mp4, render_clip

    rng = random.Random(seed)
    video = render_clip(random_clip(rng), rng)
    path.write_bytes(encode_mp4(video.frames, video.fps))
    return path
