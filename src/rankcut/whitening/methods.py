"""The built-in whiteners: ``none``, ``scale`` (ASVD) and ``cholesky`` (SVD-LLM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration import InputStatistics
from ..errors import ConfigError, FactorizationError
from ..registry import PluginConfig
from .base import (CholeskyWhitening, DiagonalWhitening, IdentityWhitening, SymmetricWhitening, Whitener,
                   WHITENERS, Whitening)


@dataclass
class NoWhiteningConfig(PluginConfig):
    pass


@WHITENERS.register("none", NoWhiteningConfig)
class NoWhitening(Whitener):
    """Plain SVD of ``W``: the data-free baseline (catastrophic on real LLMs, kept for comparison)."""

    def whiten(self, statistics: InputStatistics) -> Whitening:
        return IdentityWhitening({"path": "identity"})


@dataclass
class ScaleConfig(PluginConfig):
    alpha: float = 0.5  # ASVD's exponent on the mean absolute activation
    epsilon: float = 1e-6  # relative floor on the scale, so dead channels stay invertible

    def validate(self) -> None:
        if not 0 < self.alpha <= 2:
            raise ConfigError(f"scale whitening: alpha must be in (0, 2], got {self.alpha}")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"scale whitening: epsilon must be in (0, 1), got {self.epsilon}")


@WHITENERS.register("scale", ScaleConfig)
class ScaleWhitening(Whitener):
    """ASVD: ``S = diag(mean|x|)^α``, a diagonal stand-in for the full Gram."""

    def whiten(self, statistics: InputStatistics) -> Whitening:
        scale = statistics.abs_mean.pow(self.config.alpha)
        floor = self.config.epsilon * float(scale.max().clamp_min(torch.finfo(torch.float64).tiny))
        floored = int((scale < floor).sum())
        scale = scale.clamp_min(floor)
        return DiagonalWhitening({"path": "diagonal", "floored_channels": floored,
                                  "condition": float(scale.max() / scale.min())}, scale)


@dataclass
class CholeskyConfig(PluginConfig):
    damping: float = 1e-6  # λ = damping · mean(diag C), the first try
    damping_growth: float = 10.0  # escalation factor after a failed factorization
    max_damping: float = 1e-1  # last Cholesky try before the eigh fallback
    eigen_floor: float = 1e-10  # eigh fallback: clamp eigenvalues to eigen_floor · λ_max
    fallback: bool = True  # allow the eigh fallback

    def validate(self) -> None:
        if not 0 <= self.damping <= self.max_damping:
            raise ConfigError(f"cholesky whitening: need 0 <= damping <= max_damping, got {self.damping}, {self.max_damping}")
        if self.damping_growth <= 1:
            raise ConfigError(f"cholesky whitening: damping_growth must be > 1, got {self.damping_growth}")
        if not 0 < self.eigen_floor < 1:
            raise ConfigError(f"cholesky whitening: eigen_floor must be in (0, 1), got {self.eigen_floor}")


@WHITENERS.register("cholesky", CholeskyConfig)
class CholeskyWhitener(Whitener):
    """SVD-LLM: ``S = chol(C + λI)``, λ relative to the mean diagonal and escalated on failure;
    when no damping up to the cap works, the symmetric square root from ``eigh`` with clamped
    eigenvalues. Never an explicit inverse."""

    def whiten(self, statistics: InputStatistics) -> Whitening:
        gram = statistics.gram.double()
        if not torch.isfinite(gram).all():
            raise FactorizationError(f"input Gram of {statistics.modules} has NaN/Inf entries")
        scale = float(gram.diagonal().mean())
        if scale <= 0:
            raise FactorizationError(f"input Gram of {statistics.modules} is zero: the modules never saw a non-zero input")
        relative = self.config.damping
        attempts = 0
        while relative <= self.config.max_damping * (1 + 1e-9):
            attempts += 1
            damped = gram.clone()  # C + λI without an n x n identity: one Gram-sized copy, not two
            damped.diagonal().add_(relative * scale)
            lower, info = torch.linalg.cholesky_ex(damped)
            del damped
            if int(info) == 0:
                diagonal = lower.diagonal().abs()
                return CholeskyWhitening(
                    {"path": "cholesky", "damping": relative, "attempts": attempts,
                     # cond(S) = cond(L) >= max|L_ii| / min|L_ii|: a cheap lower bound
                     "condition_estimate": float(diagonal.max() / diagonal.min())},
                    lower,
                )
            relative = relative * self.config.damping_growth if relative > 0 else 1e-12
        if not self.config.fallback:
            raise FactorizationError(
                f"Cholesky failed for {statistics.modules} up to relative damping {self.config.max_damping} "
                "and the eigh fallback is disabled"
            )
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        top = float(eigenvalues.max())
        if not top > 0:
            raise FactorizationError(f"input Gram of {statistics.modules} has no positive eigenvalue")
        floor = self.config.eigen_floor * top
        clamped = int((eigenvalues < floor).sum())
        root = eigenvalues.clamp_min(floor).sqrt()
        return SymmetricWhitening(
            {"path": "eigh", "attempts": attempts, "clamped_eigenvalues": clamped,
             "condition": float(root.max() / root.min())},
            eigenvectors, root,
        )
