"""Webdataset pipelines per modality, shard packers and the synthetic "shapes world" generators."""

from mm_llama.data.pack import pack
from mm_llama.data.pipeline import BadSample, ShardSamples, SkipCounter, expand_shards, iterate_batches
from mm_llama.data.synth_text import synth_text
from mm_llama.data.text import TextBatches, TextDataConfig, decode_text

__all__ = [
    "BadSample", "ShardSamples", "SkipCounter", "TextBatches", "TextDataConfig", "decode_text", "expand_shards",
    "iterate_batches", "pack", "synth_text",
]
