"""Training: the shared loop (`loop.py`), checkpoints, distributed set-up, and one short script per stage."""

STAGES = ("lm", "vision-pretrain", "image-adapter", "video-adapter", "speech-pretrain", "speech-adapter")  # tts: later


def run_stage(name: str, config_path: str | None, overrides: list[str], resume: bool):
    """Run stage `name` (explicit dispatch: no registry filled by imports)."""
    from mm_llama.errors import ConfigError

    if name == "lm":
        from mm_llama.train.lm import main
    elif name == "vision-pretrain":
        from mm_llama.train.vision_pretrain import main
    elif name == "image-adapter":
        from mm_llama.train.image_adapter import main
    elif name == "video-adapter":
        from mm_llama.train.video_adapter import main
    elif name == "speech-pretrain":
        from mm_llama.train.speech_pretrain import main
    elif name == "speech-adapter":
        from mm_llama.train.speech_adapter import main
    else:
        raise ConfigError(f"unknown training stage {name!r}; available: {', '.join(STAGES)}")
    return main(config_path, overrides, resume)
