"""The whitening interface: a transform ``S`` applied to the weight and undone on the factor."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..calibration import InputStatistics
from ..registry import PluginConfig, Registry


@dataclass
class Whitening(ABC):
    """A computed ``S`` (``n x n``, float64) for one input tensor, with how it was obtained."""

    diagnostics: dict[str, Any] = field(default_factory=dict)

    @abstractmethod
    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """``W S``."""

    @abstractmethod
    def right_solve(self, rows: torch.Tensor) -> torch.Tensor:
        """``R S⁻¹`` without forming the inverse."""

    @abstractmethod
    def right_solve_transposed(self, rows: torch.Tensor) -> torch.Tensor:
        """``R S⁻ᵀ`` without forming the inverse."""


@dataclass
class IdentityWhitening(Whitening):
    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def right_solve(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def right_solve_transposed(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


@dataclass
class DiagonalWhitening(Whitening):
    scale: torch.Tensor = None  # type: ignore[assignment]  # n, positive

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale

    def right_solve(self, rows: torch.Tensor) -> torch.Tensor:
        return rows / self.scale

    def right_solve_transposed(self, rows: torch.Tensor) -> torch.Tensor:
        return rows / self.scale


@dataclass
class CholeskyWhitening(Whitening):
    lower: torch.Tensor = None  # type: ignore[assignment]  # L with L Lᵀ = C + λI

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight @ self.lower

    def right_solve(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.lower, rows, upper=False, left=False)

    def right_solve_transposed(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.lower.T, rows, upper=True, left=False)


@dataclass
class SymmetricWhitening(Whitening):
    """``S = Q diag(√λ) Qᵀ`` from ``eigh``, eigenvalues clamped: the fallback for non-PD Grams."""

    eigenvectors: torch.Tensor = None  # type: ignore[assignment]
    root: torch.Tensor = None  # type: ignore[assignment]  # √λ, positive

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        return ((weight @ self.eigenvectors) * self.root) @ self.eigenvectors.T

    def right_solve(self, rows: torch.Tensor) -> torch.Tensor:
        return ((rows @ self.eigenvectors) / self.root) @ self.eigenvectors.T

    def right_solve_transposed(self, rows: torch.Tensor) -> torch.Tensor:
        return self.right_solve(rows)  # S is symmetric


class Whitener(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[PluginConfig]]

    def __init__(self, config: PluginConfig) -> None:
        self.config = config

    @abstractmethod
    def whiten(self, statistics: InputStatistics) -> Whitening:
        """Compute ``S`` for one shared input; raise FactorizationError if impossible."""


WHITENERS: Registry[Whitener] = Registry("whitening")


def create_whitener(name: str, options: Mapping[str, Any] | None = None) -> Whitener:
    return WHITENERS.create(name, options)
