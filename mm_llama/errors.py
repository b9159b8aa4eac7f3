"""Errors raised by mm-llama.

Every error a user can cause (a bad file, a bad argument, a bad checkpoint) is an `MMLlamaError` whose message names
the input and says what is accepted. The CLI prints these without a traceback and exits with status 2.
"""


class MMLlamaError(Exception):
    """Base class of every error mm-llama raises on bad input."""


class ConfigError(MMLlamaError):
    """A configuration is invalid: unknown key, wrong type, inconsistent sizes."""


class CheckpointError(MMLlamaError):
    """A checkpoint directory or file cannot be loaded: missing shard, shape mismatch, unknown format."""


class TokenizerError(MMLlamaError):
    """A tokenizer file cannot be read, or text/ids cannot be encoded/decoded."""


class InputError(MMLlamaError):
    """A request is invalid: a prompt longer than the context, a bad sampling parameter, an unreadable file."""


class TrainingError(MMLlamaError):
    """Training cannot go on: a non-finite loss or gradient norm, nothing to resume from, a run directory in use."""


class DataError(MMLlamaError):
    """A dataset cannot be read: too many corrupt samples, no shards."""
