"""Whitening of the SVD (METHODS §1): factorize ``W S`` where ``S Sᵀ`` is the input Gram, so that
truncating the SVD of ``W S`` minimizes the output error on the calibration inputs.

Plug-ins: ``none`` (plain SVD), ``scale`` (ASVD's diagonal activation scaling) and ``cholesky``
(SVD-LLM, with relative damping escalation and a symmetric-square-root fallback).
"""

from .base import WHITENERS, Whitener, Whitening, create_whitener
from . import methods as _methods  # noqa: F401  registers the built-in whiteners

__all__ = ["WHITENERS", "Whitener", "Whitening", "create_whitener"]
