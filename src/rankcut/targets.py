"""Find the decoder blocks and the target linear modules of any Hugging Face causal LM, generically.

Decoder blocks are the longest ``nn.ModuleList`` of identically-typed modules that contain linear
layers (``model.layers`` in LLaMA, Gemma, Qwen, Mistral...). Targets are the ``nn.Linear`` modules
inside those blocks; embeddings, ``lm_head`` and norms are never targets. No model-name matching.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class TargetModule:
    name: str  # full name in ``model.named_modules()``
    block: int  # index of the decoder block that holds it
    out_features: int
    in_features: int
    bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def find_decoder_blocks(model: nn.Module, *, with_linears: bool = True) -> tuple[str, nn.ModuleList]:
    """The name and the ``nn.ModuleList`` of the model's repeated decoder blocks (``with_linears=False``:
    also once their linears are factorized)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if with_linears and not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ConfigError(
            f"{type(model).__name__} has no list of repeated blocks with linear layers; rankcut compresses "
            "decoder-only transformers whose blocks hold nn.Linear modules"
        )
    return best


def find_targets(model: nn.Module, exclude: Sequence[str] = ()) -> list[TargetModule]:
    """Every ``nn.Linear`` in the decoder blocks, in forward order, minus names matching ``exclude``
    (shell-style patterns such as ``*.k_proj`` or ``model.layers.0.*``)."""
    prefix, blocks = find_decoder_blocks(model)
    targets = []
    for index, block in enumerate(blocks):
        for local, module in block.named_modules():
            if type(module) is not nn.Linear:
                continue
            name = f"{prefix}.{index}.{local}"
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
                continue
            targets.append(TargetModule(name, index, module.out_features, module.in_features, module.bias is not None))
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no target linear modules (after exclude={list(exclude)})")
    return targets


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
