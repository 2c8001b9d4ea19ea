"""Errors users can act on. The CLI prints their message (no traceback) and exits non-zero."""


class RankcutError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ModelNotFoundError(RankcutError):
    pass


class DataNotFoundError(RankcutError):
    pass


class ConfigError(RankcutError, ValueError):
    """An invalid setting: unknown option, value out of range, inconsistent combination."""


class FactorizationError(RankcutError):
    """A module could not be whitened or factorized; the message names it."""


class ArtifactError(RankcutError):
    """A saved artifact is missing, truncated, altered or from a newer format version."""
