"""Shared machinery for allocators that learn ranks on calibration data (ARA, FermiGrad, Dobi, ZS-SVD).

Each target linear is swapped for a :class:`SpectralLinear`, a frozen view of its whitened SVD with a
per-component gate ``g``: ``y = (U σ) (g ⊙ (Bfull x)) + b``. With ``g`` a hard prefix mask of length k
it computes exactly the rank-k truncation; with ``g`` soft (a Fermi function, a staircase mask) the
loss is differentiable in the allocator's parameters. Only the gates train: weights and factors are
buffers. A layer may also run its dense weight instead (ARA's dynamic flow).

Cost: a gated layer of width ``len(g)`` costs ``len(g)(m+n)`` multiply-adds per token, so allocators
should pass gates no longer than the components they can switch on.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..decomposition import Spectrum
from ..errors import ConfigError
from ..registry import PluginConfig
from ..targets import TargetModule, set_submodule


class SpectralLinear(nn.Module):
    """A linear layer as frozen whitened-SVD factors with a trainable-from-outside gate."""

    def __init__(self, linear: nn.Linear, spectrum: Spectrum, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or linear.weight.dtype
        device = linear.weight.device
        self.dense_linear = linear  # kept for the dense flow and to restore the model
        self.register_buffer("scaled_u", (spectrum.u.double() * spectrum.sigma).to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("b_full", spectrum.b_full.to(dtype=dtype, device=device), persistent=False)
        self.gate: torch.Tensor | None = None  # set before each forward; None runs the dense weight
        self.use_dense = False

    @property
    def full_rank(self) -> int:
        return self.b_full.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_dense or self.gate is None:
            return self.dense_linear(x)
        width = self.gate.shape[0]
        hidden = F.linear(x, self.b_full[:width]) * self.gate.to(x.dtype)
        return F.linear(hidden, self.scaled_u[:, :width], self.dense_linear.bias)


@contextlib.contextmanager
def spectral_view(model: nn.Module, targets: list[TargetModule], spectra: Mapping[str, Spectrum],
                  dtype: torch.dtype | None = None) -> Iterator[dict[str, SpectralLinear]]:
    """Swap every target for a :class:`SpectralLinear` (gates unset: dense) and restore on exit.

    Model parameters are frozen meanwhile, so backward reaches only the gates.
    """
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers: dict[str, SpectralLinear] = {}
    try:
        for target in targets:
            layer = SpectralLinear(model.get_submodule(target.name), spectra[target.name], dtype)
            set_submodule(model, target.name, layer)
            layers[target.name] = layer
        yield layers
    finally:
        for name, layer in layers.items():
            set_submodule(model, name, layer.dense_linear)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires.get(name, True))


def language_model_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (token ids), in float32."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    logits = model(input_ids=batch, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def batches(calibration: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of calibration batches, reshuffled every epoch with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(calibration.shape[0], generator=generator)
        for first in range(0, len(order) - batch_size + 1, batch_size):
            yield calibration[order[first : first + batch_size]]


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder block in backward (HF's per-block checkpointing) to bound activation
    memory by one block; the model is put in train mode (dropout-free LMs) only meanwhile."""
    was_training = model.training
    supported = enabled and getattr(model, "supports_gradient_checkpointing", False)
    if supported:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        yield
    finally:
        if supported:
            model.gradient_checkpointing_disable()
        model.train(was_training)


@dataclass
class TrainingSchedule(PluginConfig):
    """How a learned allocator (ara, fermigrad, dobi) walks the calibration data: for epochs over whole
    windows, as the papers train, and read out from parameters averaged over the last steps."""

    epochs: float = 1.0  # passes over the calibration windows
    steps: int | None = None  # optimizer steps; None: as many as the epochs take
    batch_size: int = 2  # calibration windows per step
    seqlen: int | None = None  # train on the first seqlen tokens of each window (None: whole windows)
    average: float = 0.5  # read out from the parameters averaged over this last fraction of the steps

    def validate(self) -> None:
        if self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise ConfigError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.average < 1:
            raise ConfigError(f"average must be in [0, 1), got {self.average}")
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"seqlen must be >= 2 or none, got {self.seqlen}")

    def steps_for(self, windows: int) -> int:
        """``steps`` when given, else enough batches for ``epochs`` passes over ``windows`` windows."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * windows / min(self.batch_size, windows)))


class TailAverage:
    """The mean of a trained tensor over the last ``fraction`` of the ``steps`` (Polyak averaging), so a
    readout is not the last point of a noisy walk; ``fraction`` 0 keeps the last step's value."""

    def __init__(self, steps: int, fraction: float) -> None:
        self.first = steps - max(1, math.ceil(fraction * steps))
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, step: int, value: torch.Tensor) -> None:
        if step < self.first:
            return
        value = value.detach().double()
        self.total = value.clone() if self.total is None else self.total + value
        self.count += 1

    def value(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no step reached the averaged tail")
        return self.total / self.count
