"""FermiGrad (METHODS §4) and Dobi-SVD's differentiable truncation: one continuous rank per module,
learned through a Fermi-function gate on the module's frozen whitened SVD.

**Gate.** Module ``l`` with whitened SVD ``W = Σ_i σ_i u_i Bfull_i`` (i = 1..r) runs, through
:class:`SpectralLinear`, ``W(μ, T) = Σ_i f_i σ_i u_i Bfull_i`` with
``f_i = 1/(exp((i − μ_l)/T) + 1) = sigmoid((μ_l − i)/T)``. As ``T → 0`` this is the rank-``⌊μ⌋``
truncation, so ``μ`` is a continuous rank. Only ``μ`` trains (lr in rank units); weights and
factors are frozen and no weight is rebuilt per step. Dobi-SVD's mask ``½ tanh(β(γ − i)) + ½`` is the
same function at ``T = 1/(2β)``, so both allocators share this module's gate and training loop:
FermiGrad anneals ``T`` and holds the budget exactly; Dobi keeps ``T`` fixed and penalises the ratio.

**Gradient and signs.** With ``G = ∂L/∂W`` at the gated weight, ``∂L/∂g_i = σ_i u_iᵀ G Bfull_iᵀ``.
ZS-SVD's score of removing component ``i`` is ``ΔL_i = −∂L/∂g_i`` (``> 0``: removal is predicted to
raise the loss). With ``∂f_i/∂μ = f_i(1 − f_i)/T`` the chain rule gives
``∂L/∂μ = −(1/T) Σ_i f_i(1 − f_i) ΔL_i``: a Fermi-window average of ZS-SVD scores around the rank
boundary. tests/test_fermi.py checks this against finite differences and against ``G`` from a dense copy.

**Budget.** Soft rank ``N_l = Σ_i f_i`` (over all ``r`` components), soft cost
``min(N(m+n) [− N² for PivGa], mn)``: a module whose soft cost reaches dense is capped, and its readout
``⌊μ⌋`` then sits at or past break-even, i.e. dense. ``budget_mode="shift"`` (FermiGrad's default) adds
one global ``δ`` to every ``μ`` after each step, found by bisection, so the soft cost equals the
budget at the temperature of the next forward (the soft cost is continuous and non-decreasing in
``δ``); the steps themselves are scaled per module by the parameters a unit of rank costs
(:class:`BudgetStep`), so training stops where the loss per parameter is the same in every module,
the constrained optimum. ``"penalty"`` adds ``penalty · |R_soft − ρ|`` to the loss (Dobi-SVD's form, λ = 200 there).
``μ`` is kept in ``[1, r + 1]`` (Dobi: a box penalty; here a clamp inside the bisection).

**Training.** One epoch of whole calibration windows by default (``epochs``; ``steps`` overrides), the
step size decayed to 0 along a cosine, and ``μ`` averaged over the last half of the steps (``average``)
for the readout.

**Readout.** ``k = ⌊μ⌋`` of the averaged ``μ`` (past the last useful rank: dense). FermiGrad then removes components, least
predicted loss per saved parameter first, until the plan fits, and :meth:`Budget.fill` spends what is
left, most predicted loss per parameter first. Dobi rescales proportionally (:meth:`Budget.rescale`).
The prediction is ``ΔL_i`` averaged over the last quarter of training (low ``T``, ``μ`` near its final
value; the gate gradient exists for every component in the window, on both sides of the boundary);
components never inside a window count 0. ``fill_priority="energy"`` uses ``σ_i²`` instead.

**Gate window (exact to float precision).** For ``i > μ``, ``f_i < exp(−(i − μ)/T)``, so the gate mass
past ``w`` is ``Σ_{i>w} f_i < exp(−(w − μ)/T) / (exp(1/T) − 1) ≤ T exp(−(w − μ)/T)``. With
``w = ⌈μ + T log(2T/ε)⌉`` (``ε`` the compute dtype's machine epsilon) it is below ``ε/2``, under the
rounding of the kept leading terms (gates ≈ 1, larger ``σ``), and the dropped gradient terms
``f(1−f)/T`` are as small. So a layer computes ``w ≈ μ + T(16.6 + log T)`` components (float32) instead
of ``r``: full width early (``T₀`` a few percent of ``r``), ``μ + 5`` at ``T = 0.3``. Costs always
sum all ``r`` components. Saturated gates (``f = 1``) are not detached: they cost no extra matmul.

Cost per step: a forward over the blocks, then a reverse sweep that recomputes each block gated and
backpropagates (:func:`~rankcut.allocation.spectral.gated_objective`; each target ``w(m+n)``
multiply-adds per token, vs ``mn`` dense), plus a dense forward for ``objective="kl"``. Memory: one
decoder block at a time with its targets' gated factors (read from the spectra store), one chunk of
logits, and the ``L x r_max`` grid of ``μ``'s gates.
"""

from __future__ import annotations

import heapq
import math
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from ..errors import ConfigError
from ..plan import DENSE, Budget, Rank, RankPlan
from ..progress import progress_bar
from .base import ALLOCATORS, Allocation, AllocationContext, Allocator
from .baselines import uniform_rank
from .spectral import TailAverage, TrainingSchedule, batches, gate_surrogate, gated_objective

SCORE_FRACTION = 0.25  # ΔL_i for the readout is averaged over this last fraction of the steps


@dataclass
class FermiTrainingConfig(TrainingSchedule):
    """Options shared by ``fermigrad`` and ``dobi``."""

    lr: float = 2.0  # step on μ, in rank units, decayed to 0 along a cosine
    objective: Literal["ce", "kl"] = "ce"  # next-token CE, or KL(dense ‖ gated) (one more forward per step)
    fill_priority: Literal["gradient", "energy"] = "gradient"  # readout repair/fill by ΔL_i or σ_i²

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass
class FermiGradConfig(FermiTrainingConfig):
    # Chosen for the shift mode's steps on C4 validation (SmolLM2, PivGa, keep 0.8, one epoch): 2.0, which
    # dobi keeps, stopped short (C4 58.11 against 49.48 at 6.0). budget_mode="penalty" steps with Adam,
    # about ±lr ranks per step: not tuned at 6.
    lr: float = 6.0
    t_start: float = 0.05  # initial temperature, as a fraction of each module's full rank r
    t_end: float = 0.3  # final temperature in rank units (< 1: the relaxed model ≈ the truncated one)
    budget_mode: Literal["shift", "penalty"] = "shift"  # exact global μ shift, or penalty · |R − ρ|
    penalty: float = 200.0  # weight of |R_soft − ρ| in budget_mode="penalty"

    def validate(self) -> None:
        super().validate()
        if not 0 < self.t_start <= 1:
            raise ConfigError(f"fermigrad t_start (fraction of r) must be in (0, 1], got {self.t_start}")
        if not 0 < self.t_end < 1:
            raise ConfigError(f"fermigrad t_end must be in (0, 1) rank units (the relaxed model must end "
                              f"close to the truncated one), got {self.t_end}")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ConfigError(f"fermigrad penalty must be >= 0, got {self.penalty}")


@dataclass
class DobiConfig(FermiTrainingConfig):
    beta: float = 10.0  # tanh sharpness (Dobi-SVD: 10, i.e. T = 0.05)
    penalty: float = 200.0  # weight of |R_soft − ρ| (Dobi-SVD: 200)

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"dobi beta must be > 0, got {self.beta}")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ConfigError(f"dobi penalty must be >= 0, got {self.penalty}")


class FermiSystem:
    """The continuous ranks of all target modules, packed as rows of an ``L x r_max`` float64 grid
    (component ``i`` of module ``l`` at ``[l, i−1]``; entries past ``r_l`` masked), with their
    occupations, soft costs, budget shift, gate widths and readout."""

    def __init__(self, budget: Budget, device: torch.device | str = "cpu") -> None:
        self.budget = budget
        self.names = list(budget.shapes)
        shapes = [budget.shapes[name] for name in self.names]
        options = dict(dtype=torch.float64, device=device)
        self.full = torch.tensor([min(m, n) for m, n in shapes], **options)
        self.index = torch.arange(1, int(self.full.max()) + 1, **options)
        self.valid = self.index[None, :] <= self.full[:, None]
        self.width = torch.tensor([m + n for m, n in shapes], **options)  # m + n
        self.dense = torch.tensor([m * n for m, n in shapes], **options)
        self.pivga = budget.factor_format == "pivga"
        self.low = torch.ones_like(self.full)
        self.high = self.full + 1

    def uniform(self) -> torch.Tensor:
        """μ at the uniform plan's ranks (the SVD-LLM baseline), the starting point of training."""
        ranks = [max(1, uniform_rank(*self.budget.shapes[name], self.budget.keep_ratio, self.budget.factor_format))
                 for name in self.names]
        return torch.tensor(ranks, dtype=torch.float64, device=self.full.device).clamp(self.low, self.high)

    def occupations(self, mu: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """``f[l, i−1] = sigmoid((μ_l − i)/T_l)``, 0 past each module's ``r``."""
        f = torch.sigmoid((mu[:, None] - self.index[None, :]) / temperature[:, None])
        return f * self.valid

    def soft_costs(self, mu: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """``min(N(m+n) [− N²], mn)`` per module with ``N = Σ_i f_i``: capped at dense in value, with
        the uncapped gradient (straight through), so a budget penalty still acts on a module past
        break-even."""
        n = self.occupations(mu, temperature).sum(1)
        cost = n * self.width - (n * n if self.pivga else 0)
        return cost - (cost - self.dense).clamp(min=0).detach()

    def cost_slopes(self, mu: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """``c′_l = ∂cost_l/∂μ_l`` (uncapped) ``= (m+n [− 2N]) · Σ_i f_i(1 − f_i)/T``: the parameters one
        more unit of ``μ_l`` costs. At least a tiny positive number (saturated gates)."""
        with torch.no_grad():
            f = self.occupations(mu, temperature)
            n = f.sum(1)
            per_rank = (self.width - 2 * n if self.pivga else self.width).clamp(min=1.0)
            return (per_rank * (f * (1 - f)).sum(1) / temperature).clamp(min=1e-12)

    def soft_ratio(self, mu: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return self.soft_costs(mu, temperature).sum() / self.budget.dense_total

    def clamp(self, mu: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(mu, self.low), self.high)

    def shift_to_budget(self, mu: torch.Tensor, temperature: torch.Tensor, iterations: int = 64) -> torch.Tensor:
        """``clamp(μ + δ)`` with the global ``δ`` (bisection) at which the soft cost meets the budget
        from below; the ends of the range if the budget is out of reach."""
        mu = mu.detach()
        target = float(self.budget.target)

        def total(delta: float) -> float:
            return float(self.soft_costs(self.clamp(mu + delta), temperature).sum())

        low, high = float((self.low - mu).min()), float((self.high - mu).max())
        if total(high) <= target:
            return self.clamp(mu + high)
        for _ in range(iterations):
            middle = (low + high) / 2
            low, high = (middle, high) if total(middle) <= target else (low, middle)
        return self.clamp(mu + low)

    def gate_widths(self, mu: torch.Tensor, temperature: torch.Tensor, eps: float) -> list[int]:
        """``w = ⌈μ + T log(2T/ε)⌉`` in ``[1, r]``: the gate mass past ``w`` is below ``ε/2``
        (module docstring)."""
        reach = temperature * torch.log(2 * temperature / eps).clamp(min=0)
        widths = torch.minimum(torch.ceil(mu.detach() + reach), self.full).clamp(min=1)
        return [int(w) for w in widths.tolist()]

    def readout(self, mu: torch.Tensor) -> dict[str, Rank]:
        """``k = ⌊μ⌋`` in ``[1, r]``; at or past the last useful rank: dense."""
        ranks = torch.minimum(torch.floor(mu.detach().to(self.full.device)), self.full).clamp(min=1)
        return {name: self.budget.normalize(name, int(k)) for name, k in zip(self.names, ranks.tolist())}


@dataclass
class TrainingResult:
    mu: torch.Tensor  # final continuous ranks (float64, CPU)
    scores: torch.Tensor  # ΔL_i estimates, L x r_max (0 where never measured)
    curve: list[dict[str, float]]
    seconds: float
    soft_ratio: float  # soft cost / dense at the final μ and temperature


class BudgetStep:
    """Steps on ``μ`` that keep the budget's geometry, for ``budget_mode="shift"``.

    Under ``Σ_l cost_l(μ_l) = budget`` the optimum has ``(∂L/∂μ_l) / c′_l`` equal in every module
    (``c′_l`` the parameters a unit of ``μ_l`` costs). A step ``μ_l −= η (∂L/∂μ_l) / c′_l`` followed by
    the common shift that restores the budget stops exactly there. Adam per module would not: it
    normalises each ``μ``'s step to about ``±lr`` whatever the gradient's size, and the shift then
    takes back the common part, so the sign's consistency decides, not the size. Here the only
    normalisation is one scalar for all modules (the root mean square of the directions, averaged over
    steps as Adam's second moment is), which leaves the ratios between modules intact; momentum
    averages the noisy per-batch directions and the step size decays along a half cosine to zero, so the
    readout is a settled point rather than the last step of a noisy walk."""

    def __init__(self, lr: float, steps: int, beta1: float = 0.9, beta2: float = 0.99) -> None:
        self.lr, self.steps, self.beta1, self.beta2 = lr, steps, beta1, beta2
        self.momentum: torch.Tensor | None = None
        self.scale = 0.0
        self.count = 0

    def step(self, mu: torch.Tensor, slopes: torch.Tensor) -> None:
        """Move ``mu`` (in place) along ``−mu.grad / slopes``."""
        direction = mu.grad.detach() / slopes
        self.count += 1
        if self.momentum is None:
            self.momentum = torch.zeros_like(direction)
        self.momentum.mul_(self.beta1).add_(direction, alpha=1 - self.beta1)
        self.scale = self.beta2 * self.scale + (1 - self.beta2) * float(direction.square().mean())
        mean = self.momentum / (1 - self.beta1 ** self.count)
        rms = math.sqrt(self.scale / (1 - self.beta2 ** self.count))
        if rms == 0.0:
            return
        lr = self.lr * 0.5 * (1 + math.cos(math.pi * (self.count - 1) / max(1, self.steps)))
        with torch.no_grad():
            mu.sub_(lr * mean / rms)


def train_ranks(context: AllocationContext, system: FermiSystem, mu: torch.Tensor,
                temperatures: Callable[[int], Callable[[int], torch.Tensor]], config: FermiTrainingConfig,
                budget_mode: Literal["shift", "penalty"], penalty: float, label: str) -> TrainingResult:
    """Train ``μ`` through the Fermi gates on ``context.objective`` (next-token CE by default), for the
    config's epochs (or steps), with ``temperatures(steps)`` the schedule. With the global shift,
    :class:`BudgetStep` steps; with the penalty (Dobi-SVD's form), Adam; both decay along a cosine, and
    the readout is ``μ`` averaged over the last ``config.average`` of the steps."""
    budget = context.budget
    if context.calibration is None or (context.objective is None and context.stream is None):
        raise ConfigError(f"{label} trains on calibration text: it needs the model and calibration token ids")
    model = context.stream.model if context.stream is not None else None
    eps = torch.finfo(next(model.parameters()).dtype if model is not None else torch.float32).eps
    windows = context.calibration if config.seqlen is None else context.calibration[:, : config.seqlen]
    steps = config.steps_for(windows.shape[0])
    temperature = temperatures(steps)
    stream = batches(windows, min(config.batch_size, windows.shape[0]), context.seed)
    objective = context.objective or gated_objective(context.stream, context.spectra, config.objective)
    mu = system.clamp(mu.to(system.full.device)).requires_grad_()
    if budget_mode == "shift":
        step_mu, schedule = BudgetStep(config.lr, steps), None
    else:
        step_mu = torch.optim.Adam([mu], lr=config.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(step_mu, T_max=steps)
    average = TailAverage(steps, config.average)
    score_sum = torch.zeros_like(system.valid, dtype=torch.float64)
    score_count = torch.zeros_like(score_sum)
    first_scored = steps - max(1, math.ceil(SCORE_FRACTION * steps))
    full_flops = float((system.full * system.width).sum())
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    with progress_bar(f"{label}: train ranks", steps, enabled=context.show_progress) as advance:
        for step in range(steps):
            temp = temperature(step)
            if budget_mode == "shift":
                with torch.no_grad():
                    mu.copy_(system.shift_to_budget(mu, temp))
            occupations = system.occupations(mu, temp)
            widths = system.gate_widths(mu, temp, eps)
            gates = {name: row[:width] for name, row, width in zip(system.names, occupations, widths)}
            task, gradients = objective(next(stream), {name: gate.detach() for name, gate in gates.items()})
            ratio = system.soft_ratio(mu, temp)
            loss = gate_surrogate(gates, gradients)
            if budget_mode == "penalty":
                loss = loss + penalty * (ratio - budget.keep_ratio).abs()
            mu.grad = None
            loss.backward()
            gated = torch.tensor(widths, dtype=torch.float64, device=mu.device)
            if step >= first_scored:
                for row, (name, width) in enumerate(zip(system.names, widths)):
                    score_sum[row, :width] -= gradients[name].to(score_sum)
                score_count += system.index[None, :] <= gated[:, None]
            if isinstance(step_mu, BudgetStep):
                step_mu.step(mu, system.cost_slopes(mu, temp))
            else:
                step_mu.step()
                schedule.step()
            with torch.no_grad():
                mu.copy_(system.clamp(mu))
            average.update(step, mu)
            width = float((gated * system.width).sum()) / full_flops
            point = {"step": step, "loss": task, "ratio": ratio.item(), "T_max": float(temp.max()),
                     "hard_ratio": budget.total(system.readout(mu)) / budget.dense_total, "gate_width": width}
            curve.append(point)
            advance(loss=point["loss"], ratio=point["ratio"], hard=point["hard_ratio"], T=point["T_max"])
    final, temp = system.clamp(average.value().to(mu.device)), temperature(steps - 1)
    if budget_mode == "shift":
        final = system.shift_to_budget(final, temp)
    scores = torch.where(score_count > 0, score_sum / score_count.clamp(min=1), 0.0)
    return TrainingResult(final.cpu(), scores.cpu(), curve, time.perf_counter() - start,
                          float(system.soft_ratio(final, temp)))


class ComponentValues:
    """Predicted loss increase from dropping components, per module: ``ΔL_i`` (or ``σ_i²``) summed
    over ranges through tail sums, shared by the over-budget repair and :meth:`Budget.fill`."""

    def __init__(self, budget: Budget, values: dict[str, torch.Tensor]) -> None:
        self.budget = budget
        zero = torch.zeros(1, dtype=torch.float64)
        self.tails = {name: torch.cat([v.double().flip(0).cumsum(0).flip(0), zero]).tolist() for name, v in values.items()}

    def _held(self, name: str, rank: Rank) -> int:
        return len(self.tails[name]) - 1 if rank == DENSE else int(rank)

    def per_parameter(self, name: str, low: Rank, high: Rank) -> float:
        """Predicted loss of going from ``high`` down to ``low``, per parameter saved."""
        tail = self.tails[name]
        loss = tail[self._held(name, low)] - tail[self._held(name, high)]
        return loss / (self.budget.cost(name, high) - self.budget.cost(name, low))

    def priority(self, name: str, rank: int) -> float:
        return self.per_parameter(name, rank, self.budget.next_rank(name, rank))

    def remove_over_budget(self, ranks: dict[str, Rank]) -> tuple[dict[str, Rank], int]:
        """Step modules down, least loss per saved parameter first, until the plan fits."""
        budget, ranks = self.budget, dict(ranks)
        total = budget.total(ranks)

        def step_down(rank: Rank, name: str) -> Rank | None:
            return budget.max_rank(name) if rank == DENSE else (rank - 1 if rank > 1 else None)

        heap = [(self.per_parameter(name, low, rank), name) for name, rank in ranks.items()
                if (low := step_down(rank, name)) is not None]
        heapq.heapify(heap)
        removed = 0
        while total > budget.target:
            if not heap:
                raise ConfigError(f"budget {budget.target} is below the cost of rank 1 in every module ({total})")
            _, name = heapq.heappop(heap)
            low = step_down(ranks[name], name)
            total += budget.cost(name, low) - budget.cost(name, ranks[name])
            ranks[name], removed = low, removed + 1
            if (lower := step_down(low, name)) is not None:
                heapq.heappush(heap, (self.per_parameter(name, lower, low), name))
        return ranks, removed


class _FermiAllocator(Allocator):
    """Common training, readout priority and reporting of the Fermi-gate allocators."""

    needs_model = True
    config: FermiTrainingConfig

    @abstractmethod
    def temperatures(self, system: FermiSystem, steps: int) -> Callable[[int], torch.Tensor]:
        """Per-module temperatures (float64, on the system's device) at each of ``steps`` steps."""

    def _train(self, context: AllocationContext, budget_mode: Literal["shift", "penalty"],
               penalty: float) -> tuple[FermiSystem, TrainingResult, ComponentValues]:
        """Train ``μ``; also the component values that repair and fill the readout: the learned ``ΔL``
        scores, or ``σ²`` with ``fill_priority="energy"``. Their :meth:`ComponentValues.priority`
        restores first the components predicted to lower the loss most per parameter."""
        device = context.stream.device if context.stream is not None else "cpu"
        system = FermiSystem(context.budget, device)
        result = train_ranks(context, system, system.uniform(), lambda steps: self.temperatures(system, steps),
                             self.config, budget_mode, penalty, self.name)
        shapes = context.budget.shapes
        if self.config.fill_priority == "energy":
            values = {name: context.spectra[name].sigma.double().square() for name in shapes}
        else:
            values = {name: result.scores[row, : min(shapes[name])] for row, name in enumerate(shapes)}
        return system, result, ComponentValues(context.budget, values)

    def _info(self, context: AllocationContext, result: TrainingResult, trained: dict[str, Rank],
              ranks: dict[str, Rank], **extra: Any) -> dict[str, Any]:
        budget, curve = context.budget, result.curve
        span = max(1, len(curve) // 10)  # single-batch losses are noisy: means over a tenth of the steps

        def mean(points: list[dict[str, float]], key: str) -> float:
            return sum(p[key] for p in points) / len(points)

        keys = ("loss", "ratio", "hard_ratio", "gate_width")
        thin = curve[:: max(1, len(curve) // 25)]
        windows, seconds = tuple(context.calibration.shape), result.seconds  # type: ignore[union-attr]
        tokens = min(self.config.batch_size, windows[0]) * min(self.config.seqlen or windows[1], windows[1])
        info: dict[str, Any] = {
            "settings": {**self.config.to_dict(), "windows": list(windows), "tokens_per_step": tokens},
            "training": {"steps": len(curve), "seconds": seconds, "seconds_per_step": seconds / len(curve),
                         "first_loss": curve[0]["loss"], "last_loss": curve[-1]["loss"],
                         **{f"{key}_start": mean(curve[:span], key) for key in keys},
                         **{f"{key}_end": mean(curve[-span:], key) for key in keys},
                         "curve": thin if thin[-1] is curve[-1] else [*thin, curve[-1]]},
            "readout": {"soft_keep_ratio": result.soft_ratio,
                        "trained_keep_ratio": budget.total(trained) / budget.dense_total,
                        "final_keep_ratio": budget.total(ranks) / budget.dense_total,
                        "trained_dense_modules": sum(rank == DENSE for rank in trained.values()),
                        "dense_modules": sum(rank == DENSE for rank in ranks.values()),
                        "mu": {name: round(v, 3) for name, v in zip(budget.shapes, result.mu.tolist())},
                        **extra},
        }
        if context.output_dir is not None:
            info["plot"] = self._plot(ranks, context)
        return info

    def _plot(self, ranks: dict[str, Rank], context: AllocationContext) -> str | None:
        from ..plots import plot_ranks

        budget, folder = context.budget, context.output_dir
        assert folder is not None
        plan = RankPlan(dict(ranks), dict(budget.shapes), budget.keep_ratio, budget.factor_format, self.name)
        path = folder / f"{self.name}_ranks_keep{budget.keep_ratio:g}_{budget.factor_format}.png"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return str(plot_ranks(plan, path, title=f"{self.name} learned ranks"))
        except ImportError:  # matplotlib is an optional extra
            return None


@ALLOCATORS.register("fermigrad", FermiGradConfig)
class FermiGradAllocator(_FermiAllocator):
    """FermiGrad: anneal ``T`` geometrically from ``t_start · r`` to ``t_end`` while the global shift
    (or the penalty) holds the soft cost at the budget; read out ``⌊μ⌋``, repair and fill by ``ΔL``."""

    config: FermiGradConfig

    def temperatures(self, system: FermiSystem, steps: int) -> Callable[[int], torch.Tensor]:
        start = self.config.t_start * system.full
        end = torch.full_like(start, self.config.t_end)
        last = max(1, steps - 1)
        return lambda step: start * (end / start) ** (step / last)

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        system, result, values = self._train(context, self.config.budget_mode, self.config.penalty)
        trained = system.readout(result.mu)
        repaired, removed = values.remove_over_budget(trained)
        ranks = context.budget.fill(repaired, values.priority)
        info = self._info(context, result, trained, ranks, repair_removed_steps=removed)
        return Allocation(ranks, info, values.priority)


@ALLOCATORS.register("dobi", DobiConfig)
class DobiAllocator(_FermiAllocator):
    """Dobi-SVD's differentiable truncation on the whitened weight SVDs: the tanh mask is the Fermi
    gate at the fixed ``T = 1/(2β)``; the size ratio is a penalty; the readout is rescaled to the budget."""

    config: DobiConfig

    def temperatures(self, system: FermiSystem, steps: int) -> Callable[[int], torch.Tensor]:
        fixed = torch.full_like(system.full, 1.0 / (2.0 * self.config.beta))
        return lambda step: fixed

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        system, result, values = self._train(context, "penalty", self.config.penalty)
        trained = system.readout(result.mu)
        ranks = context.budget.rescale(trained, values.priority)
        info = self._info(context, result, trained, ranks, temperature=1.0 / (2.0 * self.config.beta))
        return Allocation(ranks, info, values.priority)
