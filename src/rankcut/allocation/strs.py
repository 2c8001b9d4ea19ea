"""``strs``: ASVD's sensitivity-based truncation rank search (Yuan et al. 2023, code ``hahnyuan/ASVD4LLM``).

1. **Sensitivity.** For every target and every candidate keep ratio, truncate that module alone (the
   others stay dense) to the rank whose cost is that fraction of its dense parameters, and measure
   the perplexity on a few calibration windows. Truncation runs through :func:`spectral_view` with a
   hard prefix gate, so no weights are rebuilt. Ours: a module in block ``l`` only changes blocks
   ``l..L−1``, so each probe starts from the dense inputs of its block, and all probes run in one
   streamed pass over the blocks (:meth:`ModelStream.probe_losses`): every block is loaded once, and
   the probes' activations wait on disk between blocks.
2. **Search.** For a perplexity threshold ``τ`` every module takes its smallest candidate ratio whose
   perplexity is ``≤ τ`` (dense if none); the cost falls as ``τ`` rises, so a binary search over the
   measured perplexities finds the smallest ``τ`` whose plan fits the budget (ASVD sorts the same
   table). :meth:`Budget.fill` then spends the remainder along each module's interpolated
   sensitivity curve (ours; ASVD has no fill).

The sensitivity table is the expensive part (``modules x ratios`` probes, each run from its block to
the head: quadratic in depth); it is cached as JSON in ``context.cache_dir`` under a hash of what it
depends on.
"""

from __future__ import annotations

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

from ..data import select_windows
from ..decomposition import Spectrum
from ..errors import ConfigError
from ..plan import DENSE, Budget, Rank
from ..progress import progress_bar
from ..registry import PluginConfig
from ..sweep import ModelStream
from ..workdir import write_json
from .base import ALLOCATORS, Allocation, AllocationContext, Allocator, Priority
from .baselines import uniform_rank
from .spectral import spectral_view

CACHE_VERSION = 2  # 2: tables measured by the streamed pass


@dataclass
class StrsConfig(PluginConfig):
    keep_ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.9)  # candidates per module (CLI: keep_ratios=0.3,0.5)
    # calibration windows for the perplexity (ASVD: 32 x 2048 on a GPU, about 128 times these tokens: some 17 h on
    # SmolLM2 with 2 CPU cores). 8 x 256 measured better at keep 0.8 (WikiText-2 / C4 43.40 / 64.57 against
    # 50.71 / 75.62) for four times the probe time (31 min): -a windows=8 where that time is affordable
    windows: int = 2
    tokens: int | None = 256  # tokens per window (first ones of each row; None: the whole row)
    batch_size: int = 2
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


def sensitivity_table(stream: ModelStream, spectra: Mapping[str, Spectrum], windows: torch.Tensor, batch_size: int,
                      wanted: Mapping[str, list[int]], advance: Callable[..., None] | None = None
                      ) -> tuple[float, dict[str, dict[int, float]]]:
    """The dense perplexity on ``windows`` and the perplexity with each listed module alone truncated
    to each of its ranks in ``wanted``, in one streamed pass."""

    def probes(index: int, _block: nn.Module) -> Iterator[tuple[str, int]]:
        truncated = [t for t in stream.targets if t.block == index and wanted.get(t.name)]
        if not truncated:
            return
        with spectral_view(stream.model, truncated, spectra) as layers:
            for target in truncated:
                layer = layers[target.name]
                for rank in wanted[target.name]:
                    layer.gate = torch.ones(rank, device=layer.b_full.device)
                    yield target.name, rank
                layer.gate = None

    dense, losses = stream.probe_losses(windows, batch_size, probes, progress=advance)
    table: dict[str, dict[int, float]] = {}
    for (name, rank), loss in losses.items():
        table.setdefault(name, {})[rank] = _perplexity(loss)
    return _perplexity(dense), table


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


def cache_key(stream: ModelStream, spectra: Mapping[str, Spectrum], windows: torch.Tensor,
              candidates: Mapping[str, Mapping[float, int]], config: StrsConfig) -> str:
    """Hash of what the sensitivity table depends on: model config and weights (a sample of every
    tensor, read one at a time), calibration windows, whitened singular values, candidate ranks (hence
    ratios, shapes, factor format)."""
    model = stream.model
    digest = hashlib.sha256()
    model_config = model.config.to_dict() if hasattr(model, "config") else type(model).__name__
    settings = {"version": CACHE_VERSION, "model": model_config, "windows": list(windows.shape),
                "keep_ratios": sorted(config.keep_ratios),
                "candidates": {name: sorted(c.values()) for name, c in candidates.items()}}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in stream.tensor_names():
        digest.update(name.encode() + fingerprint(stream.weights.tensor(name)))
    digest.update(windows.to(torch.int64).cpu().numpy().tobytes())
    for name in sorted(spectra):
        digest.update(name.encode() + fingerprint(spectra[name].sigma))
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
        if context.stream is None or context.calibration is None:
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
        key = cache_key(context.stream, context.spectra, windows, candidates, self.config)
        path = context.cache_dir / f"strs-{key[:24]}.json" if context.cache_dir is not None else None
        cached = _read_cache(path, key) if path is not None and self.config.use_cache else None
        evaluations = None
        if cached is None:
            wanted = {name: sorted(set(by_ratio.values())) for name, by_ratio in candidates.items()}
            evaluations = sum(len(ranks) for ranks in wanted.values())
            with progress_bar("strs: sensitivity, by block", total=context.stream.blocks + 1,
                              enabled=context.show_progress) as advance:
                dense_perplexity, measured = sensitivity_table(context.stream, context.spectra, windows,
                                                               self.config.batch_size, wanted, advance)
            cached = {"key": key, "dense_perplexity": dense_perplexity,
                      "table": {name: {str(k): ppl for k, ppl in by_rank.items()} for name, by_rank in measured.items()}}
            if path is not None:
                _write_cache(path, cached)
        table = {name: {int(k): float(ppl) for k, ppl in by_rank.items()} for name, by_rank in cached["table"].items()}
        return table, float(cached["dense_perplexity"]), path, evaluations
