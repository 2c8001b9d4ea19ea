"""Errors users can act on. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


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


def one_line(error: BaseException) -> str:
    """An exception's class and message on one line, cut to a readable length."""
    text = " ".join(str(error).split())
    return f"{error.__class__.__name__}: {text[:1000]}{'…' if len(text) > 1000 else ''}"


@contextmanager
def loading_errors(spec: str) -> Iterator[None]:
    """What transformers, huggingface_hub and safetensors raise while reading a model's files (a missing
    package, a broken file, an unknown architecture) becomes a one-line :class:`ModelLoadError`; their
    messages name the fix (``pip install …``). rankcut's own errors pass unchanged."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except RankcutError:
        raise
    except (ValueError, ImportError, StrictDataclassError, SafetensorError, OSError) as error:
        raise ModelLoadError(f"could not load model {spec!r}: {one_line(error)}") from error
