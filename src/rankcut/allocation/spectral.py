"""Shared machinery for allocators that learn ranks on calibration data (ARA, FermiGrad, Dobi, ZS-SVD).

Each target linear is swapped for a :class:`SpectralLinear`, a frozen view of its whitened SVD with a
per-component gate ``g``: ``y = (U σ) (g ⊙ (Bfull x)) + b``. With ``g`` a hard prefix mask of length k
it computes exactly the rank-k truncation; with ``g`` soft (a Fermi function, a staircase mask) the
loss is differentiable in the allocator's parameters. Only the gates train: weights and factors are
buffers. Without a gate a layer runs its dense weight (ARA's dynamic flow).

Cost: a gated layer of width ``len(g)`` costs ``len(g)(m+n)`` multiply-adds per token, so allocators
should pass gates no longer than the components they can switch on.

The training allocators see the model only through a :data:`GatedObjective`: the calibration loss at
given gates and its gradient with respect to them. :func:`gated_objective` computes both one block
resident at a time on the allocator's :class:`~rankcut.sweep.ModelStream`: a forward that saves each
block's input, the loss through the head in chunks of tokens, and a reverse sweep that recomputes each
block with its targets gated (their factors read from the spectra store for that block only) and
backpropagates into the gates. The allocators then carry the gradients into their own parameters.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..decomposition import Spectrum
from ..errors import ConfigError
from ..registry import PluginConfig
from ..sweep import ModelStream
from ..targets import TargetModule, set_submodule

GatedObjective = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[float, dict[str, torch.Tensor]]]
"""``objective(token_ids, gates) -> (loss, {name: ∂loss/∂gate})``: the calibration loss with each target
named in ``gates`` run as its whitened SVD gated by ``gates[name]`` (its first ``len(gate)`` components;
the other targets dense), and the loss's gradient with respect to every gate. The allocators' own
parameters get theirs through :func:`gate_surrogate`. Tests inject objectives whose optimum is known."""


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

    @property
    def full_rank(self) -> int:
        return self.b_full.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
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


def gated_objective(stream: ModelStream, spectra: Mapping[str, Spectrum], loss: Literal["ce", "kl"] = "ce",
                    autocast: torch.dtype | None = None) -> GatedObjective:
    """The :data:`GatedObjective` of the model behind ``stream``, one block resident at a time (module
    docstring): the mean next-token cross-entropy, or with ``loss="kl"`` the mean ``KL(p_dense ‖ p_gated)``
    (the dense model's last outputs are computed first, one more forward). ``autocast``: run the blocks
    under CUDA autocast to that dtype."""
    model = stream.model
    by_block: dict[int, list[str]] = {}
    for target in stream.targets:
        by_block.setdefault(target.block, []).append(target.name)

    def objective(batch: torch.Tensor, gates: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        reference = stream.final_hidden(batch, batch.shape[0]) if loss == "kl" else None
        gradients: dict[str, torch.Tensor] = {}

        @contextlib.contextmanager
        def gated(index: int, _block: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
            layers: dict[str, SpectralLinear] = {}
            try:
                with contextlib.ExitStack() as stack:
                    if autocast is not None:
                        stack.enter_context(torch.autocast("cuda", dtype=autocast))
                    for name in by_block.get(index, []):
                        if name in gates:
                            gate = gates[name]
                            layer = SpectralLinear(model.get_submodule(name), spectra[name].leading(gate.numel()))
                            layer.gate = gate.detach().to(layer.b_full.device).requires_grad_()
                            set_submodule(model, name, layer)
                            layers[name] = layer
                    yield {name: layer.gate for name, layer in layers.items()}
            finally:
                for name, layer in layers.items():
                    set_submodule(model, name, layer.dense_linear)

        value = stream.weight_gradients(batch, batch.shape[0], lambda _index, block: gradients.update(block), gated,
                                        weights_too=False, reference=reference)
        return value, gradients

    return objective


def gate_surrogate(gates: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_l ⟨g_l, ∂L/∂g_l⟩``: a scalar whose gradient with respect to whatever the gates were computed
    from (through their autograd graph) is the objective's, so it can stand in for the loss in backward."""
    terms = [(gates[name] * gradient.to(gates[name])).sum() for name, gradient in gradients.items()]
    return sum(terms) if terms else torch.zeros(())


def batches(calibration: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of calibration batches, reshuffled every epoch with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(calibration.shape[0], generator=generator)
        for first in range(0, len(order) - batch_size + 1, batch_size):
            yield calibration[order[first : first + batch_size]]


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
