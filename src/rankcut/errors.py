"""Errors users can act on. The CLI prints their message (no traceback) and exits non-zero."""


class RankcutError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ModelNotFoundError(RankcutError):
    """Nothing at the places a model spec can name: the message lists them."""


class ModelLoadError(RankcutError):
    """A model's files were found but could not be read: a missing package, a broken file, an unknown
    architecture. The message carries the loading library's own words, which name the fix."""


class CheckpointError(RankcutError):
    """A model checkpoint's files are missing, truncated or do not match its config; the message names
    the file."""


class DataNotFoundError(RankcutError):
    pass


class ConfigError(RankcutError, ValueError):
    """An invalid setting: unknown option, value out of range, inconsistent combination."""


class FactorizationError(RankcutError):
    """A module could not be whitened or factorized; the message names it."""


class ArtifactError(RankcutError):
    """A saved artifact is missing, truncated, altered or from a newer format version."""
