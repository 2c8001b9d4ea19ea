"""ARA (Adaptive Rank Allocation, arXiv 2510.19389): learn a monotone mask over every module's whitened
singular values on calibration text, read out binary ranks, rescale them to the exact budget.

Stated by the paper (METHODS §3): per module, a simplex vector ``p = softmax(θ)`` times a staircase
matrix gives the monotone soft mask ``m_i = Σ_{j≥i} p_j`` (every ``m_i`` depends on every logit: global
influence); a straight-through estimator makes the forward use the binary mask; a module whose binary
rank reaches break-even runs its dense weight (dynamic flow, Eq. 8); the loss is next-token CE plus a
compression loss on the global ratio plus a guidance loss for the kink at module ratio 1; only the
mask logits train; a proportional rescale meets the budget afterwards.

Reconstructed (ours), each an option of :class:`ARAConfig`: binarisation by the median (``m_i ≥ 0.5``)
or by ``argmax p``; ``R_glob`` from binary ranks with the soft gradient (``Σ`` of the straight-through
gate) with each module's cost capped at dense, the cap
passed straight through to the gradient so dense modules still feel the compression pressure; guidance
G2 (dense-regime masks pulled to all ones) or G1 (ratios above ``τ`` pulled to 1); a Laplace-shaped
initial ``p`` centred on the uniform rank (binary rank = uniform rank, soft rank ≈ uniform rank, so
the compression loss starts at ≈ 0); the gradient window; candidates up to break-even.

Training (as the paper trains, for epochs over its calibration set): whole windows, one epoch over the
calibration windows by default (``epochs``; ``steps`` overrides), Adam with the learning rate decayed
to 0 along a cosine, and the binary ranks read out from the logits averaged over the last half of the
steps (``average``), not from the last step of a noisy walk.

Exactness / efficiency of the STE: ``∂L/∂m_i`` needs component ``i``'s activation even where the gate
is 0, so exact STE gradients over all ``r`` candidates cost ``r(m+n)`` per token (twice a square dense
layer). A gated layer computes the binary prefix plus ``gradient_window · r`` components; task
gradients of components further out are dropped (set to 0), while the compression and guidance
gradients stay exact and every logit still gets gradient through the softmax. The default pairs exact
gradients (``gradient_window=1``) with candidates up to break-even (ranks past it all mean "dense"),
so with plain factors a gated layer costs about its dense weight (``k*(m+n) ≈ mn`` per token). PivGa's
break-even is ``r`` itself: there the default costs up to ``2mn`` for square weights (a smaller
``gradient_window`` trades exactness for speed).

Memory: the model runs one decoder block at a time (:func:`~rankcut.allocation.spectral.gated_objective`):
a step is a forward over the blocks that saves each block's input, the loss through the head in chunks
of tokens, and a reverse sweep that recomputes each block with its targets gated (``U σ`` and ``Bfull``
of that block's candidates, read from the spectra store) and backpropagates into the gates, about
three forward passes. Resident: one block with its gated factors and autograd tensors, one chunk of
logits, every block's input for one batch (on disk), ``Σ r`` logits and Adam's state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import ConfigError
from ..plan import DENSE, Budget, Rank, RankPlan
from ..progress import progress_bar
from .base import ALLOCATORS, Allocation, AllocationContext, Allocator, Priority, energy_priority
from .baselines import uniform_rank
from .spectral import TailAverage, TrainingSchedule, batches, gate_surrogate, gated_objective


@dataclass
class ARAConfig(TrainingSchedule):
    # Adam on logits (nats per step), decayed to 0 along a cosine. Chosen on C4 validation (SmolLM2, PivGa, one
    # epoch): 0.05 stops short of where the old constant-lr walk went (keep 0.6: C4 205.4 against 129.2 at 0.15)
    lr: float = 0.15
    lambda_c: float = 1000.0  # weight of (R_glob - keep_ratio)²
    lambda_g: float = 10.0  # weight of the guidance loss
    guidance: Literal["none", "G1", "G2"] = "G2"
    guidance_threshold: float = 0.9  # G1's τ: module ratios above it are pulled to 1
    binarize: Literal["median", "argmax"] = "median"
    candidates: Literal["full", "break_even"] = "break_even"  # logits for ranks 1..r, or 1..first dense rank
    gradient_window: float = 1.0  # components past the binary prefix computed for STE gradients, × r
    init_width: float = 0.05  # Laplace width of the initial p around the uniform rank, × r
    dense_flow: bool = True  # Eq. 8: run the dense weight once the binary rank reaches break-even
    fill_priority: Literal["mask", "energy"] = "mask"  # how the budget remainder is spent
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA only

    def validate(self) -> None:
        super().validate()
        if not self.lr > 0:
            raise ConfigError(f"ara lr must be > 0, got {self.lr}")
        if self.lambda_c < 0 or self.lambda_g < 0:
            raise ConfigError(f"ara lambda_c and lambda_g must be >= 0, got {self.lambda_c}, {self.lambda_g}")
        if not 0 < self.guidance_threshold <= 1:
            raise ConfigError(f"ara guidance_threshold must be in (0, 1], got {self.guidance_threshold}")
        if not 0 <= self.gradient_window <= 1:
            raise ConfigError(f"ara gradient_window must be in [0, 1], got {self.gradient_window}")
        if not self.init_width > 0:
            raise ConfigError(f"ara init_width must be > 0, got {self.init_width}")


def soft_mask(logits: torch.Tensor) -> torch.Tensor:
    """``m_i = Σ_{j≥i} softmax(θ)_j``: the staircase matrix times ``p`` as a reversed cumulative sum,
    so ``m_1 = 1 ≥ m_2 ≥ … ≥ 0`` and each ``m_i`` depends on every logit."""
    return logits.softmax(0).flip(0).cumsum(0).flip(0)


def binary_rank(logits: torch.Tensor, soft: torch.Tensor, rule: str) -> int:
    """Length of the binary prefix: ``#{i: m_i ≥ 0.5}`` (the median of p) or ``argmax p``."""
    if rule == "median":
        return int((soft >= 0.5).sum())
    return int(logits.argmax()) + 1


def straight_through(soft: torch.Tensor, rank: int) -> torch.Tensor:
    """The prefix mask of length ``rank`` in value (exactly), with the soft mask's gradient."""
    hard = (torch.arange(soft.numel(), device=soft.device) < rank).to(soft.dtype)
    return hard + (soft - soft.detach())


def initial_logits(length: int, rank: int, width: float) -> torch.Tensor:
    """Logits of a Laplace-shaped ``p`` centred on ``rank`` whose binary rank is ``rank`` under both
    rules (the peak is raised until it holds the median). The width (in components) shrinks near the
    ends of the candidate range so the mass stays symmetric and the soft rank ≈ ``rank`` too. Tails
    are exponential, not zero, so every logit trains."""
    width = max(0.5, min(width, min(rank - 1, length - rank) / 6))
    index = torch.arange(1, length + 1, dtype=torch.float64)
    logits = -(index - rank).abs() / width
    weights = logits.exp()
    below, above = float(weights[: rank - 1].sum()), float(weights[rank:].sum())
    logits[rank - 1] = math.log(max(1.0, 1.1 * abs(above - below) + 1e-3))
    return logits.float()


@dataclass
class ModuleMask:
    soft: torch.Tensor  # m (differentiable)
    gate: torch.Tensor  # straight-through prefix mask: value b, gradient of m
    rank: int  # binary rank k
    dense: bool  # k at or past break-even


class StaircaseMasks:
    """The trainable logits of every target module, and the masks, costs and losses made from them."""

    def __init__(self, budget: Budget, config: ARAConfig, device: torch.device | str = "cpu") -> None:
        self.budget, self.config = budget, config
        self.logits: dict[str, torch.Tensor] = {}
        self.window: dict[str, int] = {}
        for name, (m, n) in budget.shapes.items():
            full = min(m, n)
            length = full if config.candidates == "full" else min(full, budget.max_rank(name) + 1)
            start = budget.normalize(name, max(1, uniform_rank(m, n, budget.keep_ratio, budget.factor_format)))
            start = length if start == DENSE else min(int(start), length)
            logits = initial_logits(length, start, config.init_width * full)
            self.logits[name] = logits.to(device).requires_grad_()
            self.window[name] = math.ceil(config.gradient_window * full)

    def masks(self) -> dict[str, ModuleMask]:
        out = {}
        for name, logits in self.logits.items():
            soft = soft_mask(logits)
            rank = binary_rank(logits, soft, self.config.binarize)
            dense = self.budget.normalize(name, rank) == DENSE
            out[name] = ModuleMask(soft, straight_through(soft, rank), rank, dense)
        return out

    def gates(self, masks: dict[str, ModuleMask]) -> dict[str, torch.Tensor]:
        """Each module's gate (prefix plus the gradient window); past break-even none: the module runs its
        dense weight (the dense flow)."""
        return {name: mask.gate[: mask.rank + self.window[name]] for name, mask in masks.items()
                if not (self.config.dense_flow and mask.dense)}

    def module_costs(self, masks: dict[str, ModuleMask]) -> dict[str, torch.Tensor]:
        """Cost of each module at its binary rank (the rank the forward runs and the readout keeps),
        with the soft mask's gradient (the sum of the straight-through gate); capped at dense in value,
        the cap straight through in gradient. A soft-rank ratio would meet the budget while the binary
        plan overshoots it (SmolLM2, keep 0.8: soft 0.8003, binary 0.8175), and the rescale would then
        trim every module."""
        costs = {}
        for name, mask in masks.items():
            m, n = self.budget.shapes[name]
            rank = mask.gate.sum()
            cost = rank * (m + n) - (rank * rank if self.budget.factor_format == "pivga" else 0)
            costs[name] = cost - (cost - m * n).clamp(min=0).detach()
        return costs

    def global_ratio(self, masks: dict[str, ModuleMask]) -> torch.Tensor:
        return sum(self.module_costs(masks).values()) / self.budget.dense_total

    def binary_ratio(self, masks: dict[str, ModuleMask]) -> float:
        return self.budget.total({name: mask.rank for name, mask in masks.items()}) / self.budget.dense_total

    def guidance(self, masks: dict[str, ModuleMask]) -> torch.Tensor:
        """G2: mean over modules of ``mean_i (1 − m_i)²`` for modules in the dense regime, so their mask
        agrees with the dense forward. G1: ``(1 − R_l)²`` for module ratios ``R_l`` above ``τ``."""
        device = next(iter(masks.values())).soft.device
        terms = [torch.zeros((), device=device)]
        if self.config.guidance == "G2":
            terms += [(1 - mask.soft).square().mean() for mask in masks.values() if mask.dense]
        elif self.config.guidance == "G1":
            for name, cost in self.module_costs(masks).items():
                m, n = self.budget.shapes[name]
                ratio = (cost / (m * n)).clamp(max=1.0)
                if ratio.item() > self.config.guidance_threshold:
                    terms.append((1 - ratio).square())
        return sum(terms) / len(masks)


@ALLOCATORS.register("ara", ARAConfig)
class ARAAllocator(Allocator):
    """Trains staircase-mask logits on calibration text with the model and factors frozen."""

    needs_model = True
    config: ARAConfig

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        config, budget = self.config, context.budget
        if context.calibration is None or (context.objective is None and context.stream is None):
            raise ConfigError("ara trains on calibration text: it needs the model and calibration token ids")
        device = context.stream.device if context.stream is not None else torch.device("cpu")
        if config.precision == "bfloat16" and device.type != "cuda":
            raise ConfigError(f"ara precision=bfloat16 autocasts on CUDA only; the model is on {device}")
        bf16 = device.type == "cuda" and config.precision != "float32"
        windows = context.calibration if config.seqlen is None else context.calibration[:, : config.seqlen]
        masks = StaircaseMasks(budget, config, device)
        steps = config.steps_for(windows.shape[0])
        optimizer = torch.optim.Adam(masks.logits.values(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        averages = {name: TailAverage(steps, config.average) for name in masks.logits}
        stream = batches(windows, min(config.batch_size, windows.shape[0]), context.seed)
        objective = context.objective or gated_objective(context.stream, context.spectra,
                                                         autocast=torch.bfloat16 if bf16 else None)
        curve: list[dict[str, float]] = []
        start = time.perf_counter()
        with progress_bar("ara: train rank masks", steps, enabled=context.show_progress) as advance:
            for step in range(steps):
                state = masks.masks()
                gates = masks.gates(state)
                ce, gradients = objective(next(stream), {name: gate.detach() for name, gate in gates.items()})
                ratio = masks.global_ratio(state)
                penalties = config.lambda_c * (ratio - budget.keep_ratio) ** 2 + config.lambda_g * masks.guidance(state)
                loss = gate_surrogate(gates, gradients) + penalties
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:  # everything dense and no penalties: nothing to train
                    loss.backward()
                    optimizer.step()
                schedule.step()
                for name, logits in masks.logits.items():
                    averages[name].update(step, logits)
                dense = sum(mask.dense for mask in state.values())
                total = ce + float(penalties.detach())
                curve.append({"step": step, "loss": total, "ce": ce, "ratio": ratio.item(),
                              "binary_ratio": masks.binary_ratio(state), "dense": dense})
                advance(loss=total, ratio=ratio.item(), dense=dense)
        seconds = time.perf_counter() - start

        with torch.no_grad():
            for name, logits in masks.logits.items():
                logits.copy_(averages[name].value())
            final = masks.masks()
        trained = {name: mask.rank for name, mask in final.items()}
        # the remainder goes by the learned soft masks' vote for the next component (or by energy)
        if config.fill_priority == "energy":
            priority = energy_priority(context)
        else:
            priority = mask_priority(budget, {name: mask.soft.detach().cpu() for name, mask in final.items()})
        ranks = budget.rescale(trained, priority)
        info: dict[str, Any] = {
            "settings": {"device": str(device), "autocast_bf16": bf16,
                         "windows": list(windows.shape), "steps": steps, "epochs": steps * min(config.batch_size,
                                                                                                windows.shape[0]) / windows.shape[0],
                         "tokens_per_step": min(config.batch_size, windows.shape[0]) * windows.shape[1],
                         "logits": sum(t.numel() for t in masks.logits.values())},
            "training": _summary(curve, seconds),
            "readout": {"trained_keep_ratio": budget.total(trained) / budget.dense_total,
                        "trained_dense_modules": sum(budget.normalize(n, k) == DENSE for n, k in trained.items()),
                        "rescaled_keep_ratio": budget.total(ranks) / budget.dense_total,
                        "dense_modules": sum(rank == DENSE for rank in ranks.values())},
        }
        if context.output_dir is not None:
            info["plot"] = self._plot(ranks, budget, context)
        return Allocation(ranks, info, priority)

    def _plot(self, ranks: dict[str, Rank], budget: Budget, context: AllocationContext) -> str | None:
        from ..plots import plot_ranks

        plan = RankPlan(dict(ranks), dict(budget.shapes), budget.keep_ratio, budget.factor_format, self.name)
        path = context.output_dir / f"ara_ranks_keep{budget.keep_ratio:g}_{budget.factor_format}.png"
        try:
            context.output_dir.mkdir(parents=True, exist_ok=True)
            return str(plot_ranks(plan, path, title="ARA learned ranks (after rescale)"))
        except ImportError:  # matplotlib is an optional extra
            return None


def mask_priority(budget: Budget, soft: dict[str, torch.Tensor]) -> Priority:
    """``m_{k+1}`` per parameter of the step from rank k: the learned mask's vote for the next component."""

    def mask_value(name: str, rank: int) -> float:
        step = budget.next_rank(name, rank)
        value = float(soft[name][rank]) if rank < soft[name].numel() else 0.0
        return value / (budget.cost(name, step) - budget.cost(name, rank))

    return mask_value


def _summary(curve: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """Start and end of the training curve (means over the first / last tenth of the steps, since
    single-batch losses are noisy) and a thinned copy of it."""
    span = max(1, len(curve) // 10)

    def mean(points: list[dict[str, float]], key: str) -> float:
        return sum(p[key] for p in points) / len(points)

    keys = ("loss", "ce", "ratio", "binary_ratio")
    thin = curve[:: max(1, len(curve) // 25)]
    return {
        "steps": len(curve), "seconds": seconds, "seconds_per_step": seconds / len(curve),
        **{f"{key}_start": mean(curve[:span], key) for key in keys},
        **{f"{key}_end": mean(curve[-span:], key) for key in keys},
        "dense_start": curve[0]["dense"], "dense_end": curve[-1]["dense"],
        "curve": thin if thin[-1] is curve[-1] else [*thin, curve[-1]],
    }
