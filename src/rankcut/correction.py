"""``closed_loop="correct"``: ZS-SVD's between-stage weight correction, applied to the final rank plan.

Truncation moves each planned module from its weight ``W`` to ``T = A_k B_k``. ZS-SVD (arXiv
2602.02848, ``pull_subspace`` in its code) takes the calibration loss gradient ``g`` with respect to each
weight at the truncated model and moves the weight back towards ``W`` along it,

    ``W' = T + c g``,  ``c = <g, W − T> / <g, g>``,

the projection of the truncation error ``W − T`` on the gradient: the smallest step along ``g`` that
undoes the first-order loss change of the truncation (``<g, c g> = <g, W − T>``). ``W'`` is then
decomposed again (its whitened SVD) and cut at the planned rank. A round here is one gradient sweep of
the truncated model (the streamed reverse sweep of :mod:`rankcut.sweep`, every block's gradients waiting
on disk) and one open-loop calibration pass in which each module's ``W'`` is decomposed under the
whitening of its dense inputs; the next round truncates the corrected spectra. The model is factorized
from the last round's spectra.

Departures from ZS-SVD, where the correction sits between allocation stages: the plan does not change
between rounds (ZS-SVD plans again), the whitening is the dense model's (ZS-SVD profiles it again on the
corrected model), and ``g`` is the mean gradient over the correction windows (ZS-SVD: one batch of 1024
tokens).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .decomposition import Spectrum
from .sweep import ActivationStore, ModelStream


def pulled_weight(weight: torch.Tensor, truncation: torch.Tensor, gradient: torch.Tensor,
                  share: float = 1.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """``W' = T + share · (<g, W − T> / <g, g>) g`` in float64 (``T`` when ``g`` is zero), and what the step
    did: its coefficient (``share`` included), the first-order loss change it undoes (``share · <g, W − T>``)
    and its size relative to ``‖W − T‖``."""
    w, t, g = weight.double(), truncation.double(), gradient.double()
    error = w - t
    energy = float(g.square().sum())
    if energy == 0.0:
        return t, {"coefficient": 0.0, "first_order_change": 0.0, "relative_step": 0.0}
    along = share * float((g * error).sum())
    coefficient = along / energy
    error_norm = float(error.norm())
    return t + coefficient * g, {"coefficient": coefficient, "first_order_change": along,
                                 "relative_step": abs(coefficient) * energy ** 0.5 / error_norm if error_norm else 0.0}


def truncation_gradients(stream: ModelStream, spectra: Mapping[str, Spectrum], ranks: Mapping[str, int],
                         windows: torch.Tensor, batch_size: int, store: ActivationStore, *, from_block: int = 0,
                         progress: Callable[..., None] | None = None) -> float:
    """The mean loss gradient over ``windows`` with respect to every target weight, at the model whose
    modules in ``ranks`` run truncated (:meth:`ModelStream.truncated`); the gradients of those modules, for
    each block from ``from_block`` on, go to ``store`` under the block's index (float32). Returns the loss."""

    def keep(index: int, gradients: dict[str, torch.Tensor]) -> None:
        if index >= from_block:
            store.put(index, {name: g.float().cpu() for name, g in gradients.items() if name in ranks})

    return stream.weight_gradients(windows, batch_size, keep, change=stream.truncated(spectra, ranks),
                                   progress=progress)
