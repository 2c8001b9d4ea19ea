"""``zerosum``: ZS-SVD's first-order scores and two-heap zero-sum selection (arXiv 2602.02848).

**Score.** Removing whitened component ``i`` of a module changes the calibration loss, to first order,
by ``ΔL_i = −σ_i u_iᵀ (G S⁻ᵀ) v_i = −σ_i u_iᵀ G Bfull_iᵀ`` (G: mean loss gradient w.r.t. the weight,
``Bfull = Vᵀ S⁻¹``). In the gated view of ``spectral.py``, ``W(g) = Σ_i g_i σ_i u_i Bfull_i``, so
``∂L/∂g_i`` at ``g = 1`` is ``σ_i u_iᵀ G Bfull_iᵀ``; removing ``i`` is the step ``g_i: 1 → 0``, hence
``ΔL_i = −∂L/∂g_i``. The model's own dense weight gradient gives every score of a module with one
projection, and :class:`~rankcut.sweep.ModelStream` computes those gradients one block resident at a
time (a forward that saves each block's input, then a reverse sweep), so the scores of a 7B model need
the memory of one block.
Sign convention (the paper's): ``ΔL_i > 0`` — removal is predicted to raise the loss; ``ΔL_i < 0`` —
to lower it.

**Selection** (as in ZS-SVD's code, ``selection_mode=zero_sum``). Every module offers only its smallest
remaining component, so truncation stays spectrally ordered. The offers sit in two min-heaps keyed by
``|ΔL|``: Q₊ (``ΔL ≥ 0``) and Q₋. With ``s`` the summed ``ΔL`` of the removals so far, pop from Q₊ when
``s ≤ 0`` and from Q₋ otherwise (the other heap when the preferred one is empty), then offer that
module's next component — the predicted loss change stays near zero while parameters are removed.
A module saves nothing until its rank falls to break-even (``Budget.max_rank``); removal stops once the
plan fits the budget, modules left above break-even stay dense, and :meth:`Budget.fill` spends the
(sub-step) remainder on the components whose restoration is predicted to lower the loss the most per
parameter. ``min_rank_ratio`` is ZS-SVD's per-module floor (``keep_rank_ratio``, fraction of break-even).

**Stages** (ZS-SVD's ``num_stages``; default 1 here, 4 in ZS-SVD, see :class:`ZeroSumConfig`). The removal is split into equal shares of the
parameters to remove; before each share the scores are computed again at the plan so far: the
truncated targets run as their rank-k whitened truncations, so the first-order model is re-centred
where the previous stages left it. Each stage costs one gradient sweep. Unlike ZS-SVD, the factors are
not recomputed between stages (the spectra are the open-loop ones) and there is no weight correction:
this allocator only chooses ranks (ZS-SVD's correction is ``closed_loop="correct"``, on the final plan,
:mod:`rankcut.correction`).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..data import select_windows
from ..decomposition import Spectrum
from ..errors import ConfigError
from ..plan import DENSE, Budget, Rank
from ..progress import progress_bar
from ..registry import PluginConfig
from ..sweep import ModelStream
from .base import ALLOCATORS, Allocation, AllocationContext, Allocator, Priority


@dataclass
class ZeroSumConfig(PluginConfig):
    windows: int | None = 32  # calibration rows for the mean gradient (None: all); ZS-SVD uses 256 x 2048 tokens
    batch_size: int = 4  # windows per recomputation of a block in the reverse sweep
    min_rank_ratio: float = 0.0  # rank floor as a fraction of the break-even rank (ZS-SVD: 0, 0.3 at 60% pruning)
    # removal in equal shares, each scored at the plan so far. ZS-SVD's default is 4, but on SmolLM2 (keep 0.8,
    # WikiText-2 test) 4 stages gave 39.96 against 38.32 for one, at four times the gradient time: 1
    stages: int = 1

    def validate(self) -> None:
        if self.windows is not None and self.windows < 1:
            raise ConfigError(f"zerosum windows must be >= 1 or none, got {self.windows}")
        if self.batch_size < 1:
            raise ConfigError(f"zerosum batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ConfigError(f"zerosum stages must be an integer >= 1, got {self.stages!r}")
        if not 0.0 <= self.min_rank_ratio <= 1.0:
            raise ConfigError(f"zerosum min_rank_ratio must be in [0, 1], got {self.min_rank_ratio}")


def component_scores(stream: ModelStream, spectra: Mapping[str, Spectrum], windows: torch.Tensor,
                     batch_size: int, *, ranks: Mapping[str, Rank] | None = None,
                     advance: Callable[..., None] | None = None) -> dict[str, torch.Tensor]:
    """``ΔL_i = −σ_i u_iᵀ G Bfull_iᵀ`` (float64) for every component of every target, G the gradient of
    the mean next-token loss over ``windows`` with respect to the target's weight. With ``ranks`` the
    model runs truncated to them (a module at ``DENSE`` or absent keeps its weight), so the scores are
    ``−∂L/∂g_i`` at that plan's gates: for a kept component the change of removing it, for a removed one
    minus the change of restoring it."""
    scores: dict[str, torch.Tensor] = {}

    def project(_block: int, gradients: dict[str, torch.Tensor]) -> None:
        for name, gradient in gradients.items():
            spectrum = spectra[name]
            g = gradient.double()
            u, b_full = spectrum.u.to(g.device, torch.float64), spectrum.b_full.to(g.device, torch.float64)
            sigma = spectrum.sigma.to(g.device, torch.float64)
            scores[name] = (-sigma * ((g @ b_full.T) * u).sum(dim=0)).cpu()

    truncated = {name: int(rank) for name, rank in (ranks or {}).items() if rank != DENSE}
    change = stream.truncated(spectra, truncated) if truncated else None
    stream.weight_gradients(windows, batch_size, project, change=change, progress=advance)
    return {t.name: scores[t.name] for t in stream.targets}


def zero_sum_ranks(budget: Budget, scores: Mapping[str, torch.Tensor], floors: Mapping[str, int], *,
                   start: Mapping[str, int] | None = None,
                   target: int | None = None) -> tuple[dict[str, Rank], dict[str, Any]]:
    """Remove components by the two-heap zero-sum rule (module docstring) from the ranks ``start``
    (default: full rank, nothing removed) until the plan costs at most ``target`` (default: the budget)."""
    names = list(scores)
    deltas = {name: scores[name].tolist() for name in names}
    ranks = {name: len(deltas[name]) if start is None else int(start[name]) for name in names}
    target = budget.target if target is None else target

    def cost(name: str) -> int:
        return budget.cost(name, budget.normalize(name, ranks[name]))

    raising: list[tuple[float, int]] = []  # Q₊: removals predicted to raise the loss, smallest |ΔL| first
    lowering: list[tuple[float, int]] = []  # Q₋

    def offer(index: int) -> None:
        name = names[index]
        if ranks[name] > floors[name]:
            delta = deltas[name][ranks[name] - 1]
            heapq.heappush(raising if delta >= 0 else lowering, (abs(delta), index))

    for index in range(len(names)):
        offer(index)
    total = sum(cost(name) for name in names)
    running, removed = 0.0, 0
    while total > target:
        preferred, other = (raising, lowering) if running <= 0 else (lowering, raising)
        heap = preferred or other
        if not heap:
            raise ConfigError(f"zerosum cannot reach the budget {budget.target} (at {total}): every module is at its "
                              "rank floor; lower min_rank_ratio or raise keep_ratio")
        _, index = heapq.heappop(heap)
        name = names[index]
        before = cost(name)
        ranks[name] -= 1
        running += deltas[name][ranks[name]]
        total += cost(name) - before
        removed += 1
        offer(index)
    return ({name: budget.normalize(name, rank) for name, rank in ranks.items()},
            {"running_sum": running, "removed_components": removed})


def predicted_loss_change(scores: Mapping[str, torch.Tensor], ranks: Mapping[str, Rank],
                          start: Mapping[str, int] | None = None) -> float:
    """First-order loss change of going from ``start`` (default: full rank) to ``ranks``: the summed
    ``ΔL`` of the components removed in between."""
    total = 0.0
    for name, rank in ranks.items():
        if rank != DENSE:
            end = len(scores[name]) if start is None else start[name]
            total += float(scores[name][int(rank):end].sum())
    return total


def score_priority(budget: Budget, scores: Mapping[str, torch.Tensor]) -> Priority:
    """Restore first the components whose removal is predicted to hurt most per parameter (going
    dense restores the whole remaining tail)."""
    tails = {name: torch.cat([s.flip(0).cumsum(0).flip(0), s.new_zeros(1)]).tolist()
             for name, s in scores.items()}  # tails[k]: summed ΔL of components k, k+1, ...
    deltas = {name: s.tolist() for name, s in scores.items()}

    def priority(name: str, rank: int) -> float:
        step = budget.next_rank(name, rank)
        gain = tails[name][rank] if step == DENSE else deltas[name][rank]
        return gain / (budget.cost(name, step) - budget.cost(name, rank))

    return priority


@ALLOCATORS.register("zerosum", ZeroSumConfig)
class ZeroSumAllocator(Allocator):
    """ZS-SVD rank allocation (see the module docstring); needs the model and calibration data."""

    needs_model = True
    config: ZeroSumConfig

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        if context.stream is None or context.calibration is None:
            raise ConfigError("zerosum needs the model and calibration data")
        budget, config = context.budget, self.config
        windows = select_windows(context.calibration, config.windows, context.seed)
        floors = {name: min(min(budget.shapes[name]), max(1, math.ceil(config.min_rank_ratio * budget.max_rank(name))))
                  for name in budget.shapes}
        ranks: dict[str, Rank] = {name: DENSE for name in budget.shapes}
        stages, seconds = [], {"gradients": 0.0, "selection": 0.0}
        for stage in range(1, config.stages + 1):
            # each stage removes an equal share of what the budget asks, scored at the plan so far
            target = budget.dense_total - (budget.dense_total - budget.target) * stage // config.stages
            start = time.perf_counter()
            with progress_bar(f"zerosum stage {stage}/{config.stages}: forward, then backward, by block",
                              total=2 * context.stream.blocks, enabled=context.show_progress) as advance:
                scores = component_scores(context.stream, context.spectra, windows, config.batch_size, ranks=ranks,
                                          advance=advance)
            seconds["gradients"] += time.perf_counter() - start
            start = time.perf_counter()
            current = {name: len(scores[name]) if rank == DENSE else int(rank) for name, rank in ranks.items()}
            ranks, selection = zero_sum_ranks(budget, scores, floors, start=current, target=target)
            seconds["selection"] += time.perf_counter() - start
            stages.append({"target": target, **selection,
                           "predicted_loss_change": predicted_loss_change(scores, ranks, current)})
        priority = score_priority(budget, scores)
        ranks = budget.fill(ranks, priority)
        every = torch.cat(list(scores.values()))
        info = {
            "settings": {**config.to_dict(), "windows_used": windows.shape[0], "tokens_used": windows.numel()},
            "stages": stages,
            "negative_score_fraction": float((every < 0).double().mean()),
            "recomputed_batches_per_block": math.ceil(windows.shape[0] / config.batch_size),
            "seconds": seconds,
        }
        return Allocation(ranks, info, priority)
