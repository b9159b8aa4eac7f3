"""The Llama 3 paper's speech system prompts (§8.3.2), in one place: the speech-adapter stage's data, `transcribe`,
the `asr` evaluation and the text corpus's typed `repeat` samples (which teach the demo trunk the skill `asr` needs)
all write them from here, so they cannot drift apart."""

from __future__ import annotations

__all__ = ["SYSTEM_PROMPTS", "system_prompt"]

# Spoken dialogue has no system prompt.
SYSTEM_PROMPTS = {"asr": "Repeat after me in {language}:", "ast": "Translate the following sentence into {language}:",
                  "dialogue": None}


def system_prompt(task: str, language: str = "English") -> str | None:
    """The system prompt of speech task `task` (a key of SYSTEM_PROMPTS) in `language`; None for dialogue."""
    template = SYSTEM_PROMPTS[task]
    return None if template is None else template.format(language=language)
