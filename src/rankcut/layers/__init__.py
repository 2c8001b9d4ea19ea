"""Factorized replacements for ``nn.Linear`` and how to describe and rebuild them from a config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .lowrank import LowRankLinear
from .pivga import PivGaLinear

# layer type name (stored in artifacts) -> class; every class shares LowRankLinear's constructor
LAYER_CLASSES: dict[str, type[nn.Module]] = {"lowrank": LowRankLinear, "pivga": PivGaLinear}


def describe_layer(module: nn.Module) -> dict[str, Any] | None:
    """The JSON description an artifact stores for a factorized module (None for dense ones)."""
    for type_name, cls in LAYER_CLASSES.items():
        if type(module) is cls:
            return {"type": type_name, "rank": module.rank, **getattr(module, "layer_options", lambda: {})()}
    return None


def build_layer(description: dict[str, Any], in_features: int, out_features: int, bias: bool,
                *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """An empty layer matching ``description`` (weights to be loaded into it)."""
    options = dict(description)
    type_name = options.pop("type")
    rank = options.pop("rank")
    try:
        cls = LAYER_CLASSES[type_name]
    except KeyError:
        raise ValueError(f"unknown factorized layer type {type_name!r}; known: {sorted(LAYER_CLASSES)}") from None
    return cls(in_features, out_features, rank, bias, dtype=dtype, device=device, **options)


def convert_to_pivga(model: nn.Module) -> nn.Module:
    """Gauge-fix every plain factorized layer in place (lossless up to rounding; fewer numbers)."""
    for name, module in list(model.named_modules()):
        if type(module) is LowRankLinear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = PivGaLinear.from_factors(module.weight_a.detach(), module.weight_b.detach(),
                                             None if module.bias is None else module.bias.detach())
            setattr(parent, child, layer)
    return model


__all__ = ["LAYER_CLASSES", "LowRankLinear", "PivGaLinear", "build_layer", "convert_to_pivga", "describe_layer"]
