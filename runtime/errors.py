"""Exceptions Lingli raises for bad input.

Every error names the problem (file, tensor, field, value) so a user can fix
it without reading a traceback. The CLI prints these without a traceback.
"""


class LingliError(Exception):
    """Base class for every error Lingli reports to a user."""


class ConfigError(LingliError):
    """config.json is missing, malformed, or describes an unsupported model."""


class CheckpointError(LingliError):
    """A weight file is missing, truncated, lies in its header, or mismatches the config."""


class TokenizerError(LingliError):
    """A tokenizer file is missing or malformed, or text is not valid UTF-8."""


class ContextLengthError(LingliError):
    """A prompt (plus requested tokens) does not fit the model's context window."""


class SamplingError(LingliError):
    """A sampling parameter is out of range."""


class QueueFullError(LingliError):
    """The server is at capacity: too many requests are already waiting to run."""
