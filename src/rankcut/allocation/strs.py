"""``strs``: ASVD's sensitivity-based truncation rank search (Yuan et al. 2023, code ``hahnyuan/ASVD4LLM``).

1. **Sensitivity.** For every target and every candidate keep ratio, truncate that module alone (the
   others stay dense) to the rank whose cost is that fraction of its dense parameters, and measure
   the perplexity on a few calibration windows. Truncation runs through :func:`spectral_view` with a
   hard prefix gate, so no weights are rebuilt. Ours: a module in block ``l`` only changes blocks
   ``l..L−1``, so blocks before it replay their recorded dense outputs (``reuse_prefix``; exact).
2. **Search.** For a perplexity threshold ``τ`` every module takes its smallest candidate ratio whose
   perplexity is ``≤ τ`` (dense if none); the cost falls as ``τ`` rises, so a binary search over the
   measured perplexities finds the smallest ``τ`` whose plan fits the budget (ASVD sorts the same
   table). :meth:`Budget.fill` then spends the remainder along each module's interpolated
   sensitivity curve (ours; ASVD has no fill).

The sensitivity table is the expensive part (``modules x ratios`` forward passes over the windows);
it is cached as JSON in ``context.cache_dir`` under a hash of everything it depends on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..decomposition import Spectrum
from ..errors import ConfigError
from ..evaluation.perplexity import window_nll
from ..plan import DENSE, Budget, Rank
from ..progress import progress_bar
from ..registry import PluginConfig
from ..targets import TargetModule, find_decoder_blocks
from ..workdir import write_json
from .base import ALLOCATORS, Allocation, AllocationContext, Allocator, Priority
from .baselines import uniform_rank
from .spectral import spectral_view
from .zerosum import select_windows

CACHE_VERSION = 1


@dataclass
class StrsConfig(PluginConfig):
    keep_ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.9)  # candidates per module (CLI: keep_ratios=0.3,0.5)
    windows: int = 2  # calibration windows for the perplexity (ASVD: 32 x 2048 on a GPU)
    tokens: int | None = 256  # tokens per window (first ones of each row; None: the whole row)
    batch_size: int = 2
    reuse_prefix: bool = True  # replay dense outputs of the blocks before the truncated module
    use_cache: bool = True  # reuse a matching cached table (one is written whenever cache_dir is set)

    def __post_init__(self) -> None:
        """Accept a comma-separated string (CLI) or a list (JSON) of ratios."""
        values = self.keep_ratios.split(",") if isinstance(self.keep_ratios, str) else self.keep_ratios
        try:
            self.keep_ratios = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise ConfigError(f"strs keep_ratios must be numbers, got {self.keep_ratios!r}") from None

    def validate(self) -> None:
        ratios = self.keep_ratios
        if not ratios or not all(0 < r < 1 for r in ratios):
            raise ConfigError(f"strs keep_ratios must be a non-empty list of values in (0, 1), got {list(ratios)}")
        if len(set(ratios)) != len(ratios):
            raise ConfigError(f"strs keep_ratios has duplicates: {ratios}")
        if self.windows < 1:
            raise ConfigError(f"strs windows must be >= 1, got {self.windows}")
        if self.tokens is not None and self.tokens < 2:
            raise ConfigError(f"strs tokens must be >= 2 or none, got {self.tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"strs batch_size must be >= 1, got {self.batch_size}")


class _Replay(nn.Module):
    """Stands in for a decoder block before the truncated one: returns the recorded dense output of
    the last such block, whatever it is given (attributes still resolve to the real block)."""

    def __init__(self, inner: nn.Module, recorded: dict[str, Any]) -> None:
        super().__init__()
        self.inner, self.recorded = inner, recorded

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        return self.recorded["output"]


class SensitivityRunner:
    """Perplexity of the model on fixed windows with at most one module truncated."""

    def __init__(self, model: nn.Module, targets: list[TargetModule], spectra: Mapping[str, Spectrum],
                 windows: torch.Tensor, batch_size: int, reuse_prefix: bool = True) -> None:
        self.model, self.targets, self.spectra = model, targets, spectra
        self.batches = list(windows.split(batch_size))
        self.tokens = windows.shape[0] * (windows.shape[1] - 1)  # predicted positions
        self.reuse_prefix = reuse_prefix
        self.blocks = find_decoder_blocks(model)[1]
        self.outputs: list[list[Any]] = []  # batch -> dense output of every block
        self.evaluations = 0
        self.dense_perplexity = self._dense()

    @torch.inference_mode()
    def _dense(self) -> float:
        """Dense perplexity; records every block's output per batch for the prefix replay."""
        current: list[Any] = []
        hooks = [block.register_forward_hook(lambda _m, _i, output: current.append(output)) for block in self.blocks]
        total = 0.0
        try:
            for batch in self.batches:
                current = []
                total += float(window_nll(self.model, batch).sum())
                if self.reuse_prefix:
                    self.outputs.append(current)
        finally:
            for hook in hooks:
                hook.remove()
        return _perplexity(total / self.tokens)

    @contextlib.contextmanager
    def _from_block(self, index: int, recorded: dict[str, Any]) -> Iterator[None]:
        if not self.reuse_prefix or index == 0:
            yield
            return
        originals = [self.blocks[i] for i in range(index)]
        for i, block in enumerate(originals):
            self.blocks[i] = _Replay(block, recorded)
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    @torch.inference_mode()
    def table(self, candidates: Mapping[str, list[int]],
              advance: Callable[..., None] | None = None) -> dict[str, dict[int, float]]:
        """Perplexity with each listed module alone truncated to each of its candidate ranks."""
        out: dict[str, dict[int, float]] = {}
        named = [t for t in self.targets if candidates.get(t.name)]
        with spectral_view(self.model, self.targets, self.spectra) as layers:
            for block in sorted({t.block for t in named}):
                recorded: dict[str, Any] = {}
                with self._from_block(block, recorded):
                    for target in (t for t in named if t.block == block):
                        layer = layers[target.name]
                        out[target.name] = {}
                        for rank in candidates[target.name]:
                            layer.gate = torch.ones(rank, device=layer.b_full.device)
                            total = 0.0
                            for b, batch in enumerate(self.batches):
                                if self.reuse_prefix and block > 0:
                                    recorded["output"] = self.outputs[b][block - 1]
                                total += float(window_nll(self.model, batch).sum())
                            layer.gate = None
                            out[target.name][rank] = _perplexity(total / self.tokens)
                            self.evaluations += 1
                            if advance is not None:
                                advance(ppl=out[target.name][rank])
        return out


def _perplexity(mean_nll: float) -> float:
    if math.isnan(mean_nll):
        return math.inf  # never preferred by the threshold search
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def candidate_ranks(budget: Budget, keep_ratios: tuple[float, ...]) -> dict[str, dict[float, int]]:
    """Per module, the rank of each keep ratio (its cost ≈ that fraction of the dense parameters);
    ratios whose rank would be dense are dropped."""
    out: dict[str, dict[float, int]] = {}
    for name, (m, n) in budget.shapes.items():
        ranks = {ratio: budget.normalize(name, max(1, uniform_rank(m, n, ratio, budget.factor_format)))
                 for ratio in sorted(keep_ratios)}
        out[name] = {ratio: int(rank) for ratio, rank in ranks.items() if rank != DENSE}
    return out


def threshold_ranks(budget: Budget,
                    curves: Mapping[str, list[tuple[int, float]]]) -> tuple[dict[str, Rank], float | None]:
    """The plan of the smallest perplexity threshold that fits the budget (module docstring).

    ``curves[name]`` lists ``(rank, perplexity)`` by increasing rank. Returns the ranks and the
    threshold (None when the dense model already fits).
    """
    def plan(threshold: float) -> dict[str, Rank]:
        return {name: next((rank for rank, ppl in curve if ppl <= threshold), DENSE) for name, curve in curves.items()}

    if budget.total({name: DENSE for name in curves}) <= budget.target:
        return {name: DENSE for name in curves}, None
    thresholds = sorted({ppl for curve in curves.values() for _, ppl in curve})
    if not thresholds or budget.total(plan(thresholds[-1])) > budget.target:
        raise ConfigError(f"strs cannot reach keep ratio {budget.keep_ratio} even with every module at its smallest "
                          "candidate; add smaller keep_ratios")
    low, high = 0, len(thresholds) - 1  # the answer lies in [low, high]
    while low < high:
        mid = (low + high) // 2
        if budget.total(plan(thresholds[mid])) <= budget.target:
            high = mid
        else:
            low = mid + 1
    return plan(thresholds[low]), thresholds[low]


def fingerprint(tensor: torch.Tensor, samples: int = 4096) -> bytes:
    """Bytes of an evenly strided sample of ``tensor`` (float64): cheap, and changes with the weights."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    return flat[::step][:samples].double().cpu().numpy().tobytes()


def cache_key(model: nn.Module, spectra: Mapping[str, Spectrum], windows: torch.Tensor,
              candidates: Mapping[str, Mapping[float, int]], config: StrsConfig) -> str:
    """Hash of what the sensitivity table depends on: model config and weights, calibration windows,
    whitened spectra, candidate ranks (hence ratios, shapes, factor format)."""
    digest = hashlib.sha256()
    model_config = model.config.to_dict() if hasattr(model, "config") else type(model).__name__
    settings = {"version": CACHE_VERSION, "model": model_config, "windows": list(windows.shape),
                "keep_ratios": sorted(config.keep_ratios),
                "candidates": {name: sorted(c.values()) for name, c in candidates.items()}}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, parameter in model.named_parameters():
        digest.update(name.encode() + fingerprint(parameter))
    digest.update(windows.to(torch.int64).cpu().numpy().tobytes())
    for name in sorted(spectra):
        digest.update(name.encode() + fingerprint(spectra[name].sigma) + fingerprint(spectra[name].b_full))
    return digest.hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("key") == key else None


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """Atomically, with a per-process temporary name: several runs may share the cache folder and
    compute the same table at once; a reader sees the old file or a whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data, indent=None, what="strs sensitivity cache", unique=True,
               elsewhere="point RANKCUT_CACHE to another folder")


def sensitivity_priority(budget: Budget, curves: Mapping[str, list[tuple[int, float]]],
                         dense_perplexity: float) -> Priority:
    """Spend the remainder where the interpolated log-perplexity curve (``curves[name]``: the
    ``(rank, perplexity)`` candidates by increasing rank, then the dense model at full rank) falls
    fastest per parameter."""
    interpolated = {}
    for name, curve in curves.items():
        m, n = budget.shapes[name]
        points = [*curve, (min(m, n), dense_perplexity)]
        log_ppl = np.minimum(np.log([p for _, p in points]), 700.0)  # an infinite perplexity: the cap
        interpolated[name] = (np.array([k for k, _ in points], dtype=float), log_ppl)

    def priority(name: str, rank: int) -> float:
        step = budget.next_rank(name, rank)
        grid, log_ppl = interpolated[name]
        after = grid[-1] if step == DENSE else rank + 1
        gain = float(np.interp(rank, grid, log_ppl) - np.interp(after, grid, log_ppl))
        return gain / (budget.cost(name, step) - budget.cost(name, rank))

    return priority


@ALLOCATORS.register("strs", StrsConfig)
class StrsAllocator(Allocator):
    """ASVD's sensitivity-based truncation rank search (see the module docstring)."""

    needs_model = True
    config: StrsConfig

    def allocate_ranks(self, context: AllocationContext) -> Allocation:
        if context.model is None or context.calibration is None:
            raise ConfigError("strs needs the model and calibration data")
        budget, config = context.budget, self.config
        windows = select_windows(context.calibration, config.windows, context.seed)
        if config.tokens is not None:
            windows = windows[:, : config.tokens]
        candidates = candidate_ranks(budget, config.keep_ratios)
        start = time.perf_counter()
        table, dense_perplexity, path, evaluations = self._sensitivity(context, windows, candidates)
        sensitivity_seconds = time.perf_counter() - start
        curves = {name: sorted(table.get(name, {}).items()) for name in budget.shapes}

        start = time.perf_counter()
        ranks, threshold = threshold_ranks(budget, curves)
        priority = sensitivity_priority(budget, curves, dense_perplexity)
        ranks = budget.fill(ranks, priority)
        info = {
            "settings": {**config.to_dict(), "windows_used": windows.shape[0], "tokens_used": windows.shape[1]},
            "dense_perplexity": dense_perplexity,
            "threshold": threshold,
            "evaluations": evaluations or 0,
            "cache_hit": evaluations is None,
            "cache_file": path.name if path is not None else None,  # in the allocator cache: no machine path
            "seconds": {"sensitivity": sensitivity_seconds, "search": time.perf_counter() - start},
            "sensitivity": {name: {str(ratio): table[name][rank] for ratio, rank in by_ratio.items()}
                            for name, by_ratio in candidates.items()},
        }
        return Allocation(ranks, info, priority)

    def _sensitivity(self, context: AllocationContext, windows: torch.Tensor, candidates: dict[str, dict[float, int]]
                     ) -> tuple[dict[str, dict[int, float]], float, Path | None, int | None]:
        """The perplexity table (module -> rank -> perplexity) and the dense perplexity, from the cache
        when it matches, else measured (and cached); also the cache path and the number of evaluations
        (None: cache hit)."""
        key = cache_key(context.model, context.spectra, windows, candidates, self.config)
        path = context.cache_dir / f"strs-{key[:24]}.json" if context.cache_dir is not None else None
        cached = _read_cache(path, key) if path is not None and self.config.use_cache else None
        evaluations = None
        if cached is None:
            runner = SensitivityRunner(context.model, context.targets, context.spectra, windows,
                                       self.config.batch_size, self.config.reuse_prefix)
            wanted = {name: sorted(set(by_ratio.values())) for name, by_ratio in candidates.items()}
            total = sum(len(ranks) for ranks in wanted.values())
            with progress_bar("strs: sensitivity", total=total, enabled=context.show_progress) as advance:
                measured = runner.table(wanted, advance)
            evaluations = runner.evaluations
            cached = {"key": key, "dense_perplexity": runner.dense_perplexity,
                      "table": {name: {str(k): ppl for k, ppl in by_rank.items()} for name, by_rank in measured.items()}}
            if path is not None:
                _write_cache(path, cached)
        table = {name: {int(k): float(ppl) for k, ppl in by_rank.items()} for name, by_rank in cached["table"].items()}
        return table, float(cached["dense_perplexity"]), path, evaluations
