"""Plain low-rank replacement of ``nn.Linear``: ``y = A (B x) + bias``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LowRankLinear(nn.Module):
    """A rank-``k`` factorization ``W ≈ A B`` of an ``out x in`` linear map.

    Two matmuls instead of one: ``B`` (``k x in``) projects down, ``A`` (``out x k``) projects up.
    The constructor signature is shared by every rankcut layer so that artifacts can rebuild an
    empty skeleton from the rank plan before the weights are loaded.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"dtype": dtype, "device": device}
        self.weight_a = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.weight_b = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """Build the layer from factors ``a`` (``out x k``) and ``b`` (``k x in``)."""
        layer = cls(b.shape[1], a.shape[0], a.shape[1], bias is not None, dtype=a.dtype, device=a.device)
        with torch.no_grad():
            layer.weight_a.copy_(a)
            layer.weight_b.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_b), self.weight_a, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``out x in`` matrix this layer represents (for checks, not for inference)."""
        return self.weight_a @ self.weight_b

    @staticmethod
    def parameter_cost(out_features: int, in_features: int, rank: int) -> int:
        """Stored numbers of the factors (bias excluded, as for the dense weight)."""
        return rank * (out_features + in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
