"""Plots people would rather look at than read (matplotlib, imported lazily: an optional extra)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from .plan import DENSE, RankPlan


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'rankcut[plot]'") from error
    return plt


def _save(figure, path: str | Path, title: str | None = None) -> Path:
    """Title, lay out, write and close ``figure`` (closed, so many plots in one process hold no memory)."""
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def _layer_and_kind(name: str) -> tuple[int, str]:
    match = re.search(r"\.(\d+)\.(.+)$", name)
    if not match:
        return -1, name
    return int(match.group(1)), match.group(2).rsplit(".", 1)[-1]


def plot_ranks(plans: Mapping[str, RankPlan] | RankPlan, path: str | Path, title: str | None = None) -> Path:
    """Kept fraction of each module's dense cost per layer, one line per module type and one panel
    per plan (so allocators can be compared side by side). Dense modules sit at 1."""
    plt = _pyplot()
    if isinstance(plans, RankPlan):
        plans = {plans.allocator: plans}
    figure, axes = plt.subplots(1, len(plans), figsize=(5.5 * len(plans), 4), sharey=True, squeeze=False)
    for axis, (label, plan) in zip(axes[0], plans.items()):
        series: dict[str, list[tuple[int, float]]] = {}
        for name, rank in plan.ranks.items():
            layer, kind = _layer_and_kind(name)
            m, n = plan.shapes[name]
            series.setdefault(kind, []).append((layer, 1.0 if rank == DENSE else plan.budget.cost(name, rank) / (m * n)))
        for kind, points in sorted(series.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=kind)
        axis.axhline(plan.keep_ratio, color="gray", linestyle="--", linewidth=0.8)
        axis.set_title(f"{label} (keep {plan.keep_ratio:g}, {plan.factor_format})")
        axis.set_xlabel("layer")
    axes[0][0].set_ylabel("kept fraction of module parameters")
    axes[0][-1].legend(fontsize="small")
    return _save(figure, path, title)


def plot_pareto(points: Sequence[tuple[str, float, float]], path: str | Path, dense: float | None = None,
                ylabel: str = "WikiText-2 perplexity") -> Path:
    """Perplexity against keep ratio, one line per method: ``points`` are (method, keep, value)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    methods: dict[str, list[tuple[float, float]]] = {}
    for method, keep, value in points:
        methods.setdefault(method, []).append((keep, value))
    for method, values in sorted(methods.items()):
        values.sort()
        axis.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=method)
    if dense is not None:
        axis.axhline(dense, color="black", linestyle=":", label="dense")
    axis.set_xlabel("keep ratio")
    axis.set_ylabel(ylabel)
    axis.set_yscale("log")
    axis.legend(fontsize="small")
    return _save(figure, path)


def plot_spectra(spectra: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                 title: str | None = None) -> Path:
    """One panel per module: singular values of ``W`` and of the whitened ``W S``, each over its largest.
    Whitening concentrates what matters to the outputs in fewer components; that is why truncating the
    whitened SVD loses less."""
    plt = _pyplot()
    columns = min(4, len(spectra))
    rows = -(-len(spectra) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3 * rows), squeeze=False)
    for axis in axes.flat[len(spectra):]:
        axis.set_visible(False)
    for axis, (name, curves) in zip(axes.flat, spectra.items()):
        for label, sigma in zip(("W", "whitened W S"), curves):
            top = max(float(sigma[0]), 1e-30)
            axis.semilogy(range(1, len(sigma) + 1), [float(s) / top for s in sigma], label=label)
        axis.set_title(name, fontsize="small")
        axis.set_xlabel("index i")
    for axis in axes[:, 0]:
        axis.set_ylabel("σ_i / σ_1")
    axes[0][0].legend(fontsize="small")
    return _save(figure, path, title)
