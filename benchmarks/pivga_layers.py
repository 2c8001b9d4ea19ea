"""Benchmark PivGa layers against dense and plain low-rank layers on real model shapes.

For every linear-module shape of SmolLM2-135M, Gemma-3-270M and LLaMA-7B, at 25/50/75 % of
``min(m, n)`` and at the plain-factor break-even rank, this measures

* forward time (median, round-robin over the layers so machine noise hits all alike, after warm-up,
  ``torch.inference_mode``, float32) of ``nn.Linear``, ``LowRankLinear`` and ``PivGaLinear`` (column
  and row variants) for a decode-like input (1 token) and a prefill-like input (512 tokens);
* stored bytes of each (state dict: float32, and float32 weights cast to bfloat16; indices are int32);
* relative reconstruction error ``‖W_stored − A B‖_F / ‖A B‖_F`` of the numbers each factorized
  layer stores in float32 and bfloat16 (applied in float64, estimated with random probes, see
  :func:`relative_error`) against the float64 plain factors, which are the truncated SVD
  ``A = U_k Σ_k^½``, ``B = Σ_k^½ V_kᵀ`` of a random matrix with Haar singular vectors and singular
  values ``σ_i = i^(-1/2)``; the plain factors' own error in the same dtype is the reference;
* the time to gauge-fix the factors (float64) and the largest ``|T|`` after maxvol;
* which variant is faster, next to the one ``variant="auto"`` picks.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/pivga_layers.py                              # full run, ~10 min
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/pivga_layers.py --quick    # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from rankcut.gauge import choose_variant
from rankcut.layers.lowrank import LowRankLinear
from rankcut.layers.pivga import PivGaLinear
from rankcut.plan import max_factor_rank

# model -> (modules sharing the shape, out_features, in_features)
MODEL_SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "SmolLM2-135M": [
        ("q_proj/o_proj", 576, 576), ("k_proj/v_proj", 192, 576),
        ("gate_proj/up_proj", 1536, 576), ("down_proj", 576, 1536),
    ],
    "Gemma-3-270M": [
        ("q_proj", 1024, 640), ("k_proj/v_proj", 256, 640), ("o_proj", 640, 1024),
        ("gate_proj/up_proj", 2048, 640), ("down_proj", 640, 2048),
    ],
    "LLaMA-7B": [("q/k/v/o_proj", 4096, 4096), ("gate_proj/up_proj", 11008, 4096), ("down_proj", 4096, 11008)],
}
RANK_FRACTIONS = (0.25, 0.5, 0.75)
FACTORIZED = ("plain", "pivga_column", "pivga_row")
LAYERS = ("dense", *FACTORIZED)
INPUTS = ("decode", "prefill")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rank_points(m: int, n: int, fractions: tuple[float, ...]) -> dict[str, int]:
    """Label -> rank: fractions of ``min(m, n)`` and the last rank where plain factors beat dense."""
    points = {f"{fraction:.0%}": max(1, round(fraction * min(m, n))) for fraction in fractions}
    points["plain break-even"] = max_factor_rank(m, n, "plain")
    return dict(sorted(points.items(), key=lambda item: item[1]))


@functools.lru_cache(maxsize=4)
def orthonormal_basis(dim: int, columns: int, seed: int) -> torch.Tensor:
    """Haar-random ``dim x columns`` orthonormal columns (float64); cached, shapes share dimensions."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, columns, generator=generator, dtype=torch.float64))
    return q


def svd_factors(m: int, n: int, rank: int, max_rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced float64 factors of the rank-``rank`` truncated SVD of ``U diag(i^-1/2) Vᵀ``."""
    root = torch.arange(1, rank + 1, dtype=torch.float64) ** -0.25
    left = orthonormal_basis(m, max_rank, seed)[:, :rank]
    right = orthonormal_basis(n, max_rank, seed + 1)[:, :rank]
    return left * root, (right * root).T.contiguous()


def time_layers(layers: Mapping[str, nn.Module], x: torch.Tensor, *, min_rounds: int, max_rounds: int,
                budget_seconds: float) -> dict[str, float]:
    """Median seconds per forward of each layer, measured round-robin so that drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in layers}
    with torch.inference_mode():
        for layer in layers.values():
            for _ in range(2):  # warm-up
                layer(x)
        start, rounds = time.perf_counter(), 0
        while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_seconds):
            for name, layer in layers.items():
                tick = time.perf_counter()
                layer(x)
                samples[name].append(time.perf_counter() - tick)
            rounds += 1
    return {name: statistics.median(times) for name, times in samples.items()}


def stored_bytes(layer: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the state dict with floating-point tensors stored in ``dtype``."""
    size = torch.finfo(dtype).bits // 8
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in layer.state_dict().values())


def relative_error(layer: nn.Module, probes: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """``‖(W_stored − A B) X‖_F / ‖A B X‖_F`` for the numbers ``layer`` stores once cast to ``dtype``.

    ``probes`` (``p x in``) are Gaussian, so ``E ‖ΔW x‖² = ‖ΔW‖_F²``: with rounding errors of full
    effective rank, 256 probes estimate the Frobenius ratio to about 1 % without forming the
    ``out x in`` matrix (which would cost ~10¹² flops per LLaMA-7B module). Applied in float64
    through the layer's own forward.
    """
    stored = copy.deepcopy(layer).to(dtype).double()
    with torch.no_grad():
        return float((stored(probes) - exact).norm() / exact.norm())


def factorized_layers(a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Float64 plain and PivGa layers for the factors, and the seconds gauge fixing took per variant."""
    layers: dict[str, nn.Module] = {"plain": LowRankLinear.from_factors(a, b)}
    seconds = {}
    for variant in ("column", "row"):
        tick = time.perf_counter()
        layers[f"pivga_{variant}"] = PivGaLinear.from_factors(a, b, variant=variant)
        seconds[variant] = time.perf_counter() - tick
    return {name: layer.requires_grad_(False) for name, layer in layers.items()}, seconds


def measure(model: str, modules: str, dense: nn.Linear, label: str, rank: int, max_rank: int,
            args: argparse.Namespace) -> dict[str, Any]:
    m, n = dense.out_features, dense.in_features
    a, b = svd_factors(m, n, rank, max_rank, args.seed)
    layers64, convert_seconds = factorized_layers(a, b)
    generator = torch.Generator().manual_seed(args.seed)
    probes = torch.randn(args.error_probes, n, generator=generator, dtype=torch.float64)
    exact = (probes @ b.T) @ a.T
    errors = {dtype_name: {name: relative_error(layer, probes, exact, dtype) for name, layer in layers64.items()}
              for dtype_name, dtype in STORAGE_DTYPES.items()}
    layers = {"dense": dense, **{name: layer.float() for name, layer in layers64.items()}}
    timings = {}
    for input_name, tokens in (("decode", 1), ("prefill", args.prefill_tokens)):
        x = torch.randn(1, tokens, n, generator=generator)
        timings[input_name] = time_layers(layers, x, min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                                          budget_seconds=args.budget_seconds)
    return {
        "model": model, "modules": modules, "out_features": m, "in_features": n, "rank_label": label, "rank": rank,
        "seconds": timings,
        "bytes": {dtype_name: {name: stored_bytes(layer, dtype) for name, layer in layers.items()}
                  for dtype_name, dtype in STORAGE_DTYPES.items()},
        "relative_error": errors,
        "convert_seconds": convert_seconds,
        "max_abs_coeff": {v: float(layers[f"pivga_{v}"].weight_coeff.abs().max()) for v in ("column", "row")},
        "auto_variant": choose_variant(m, n),
        "faster_variant": {input_name: min(("column", "row"), key=lambda v: timings[input_name][f"pivga_{v}"])
                           for input_name in INPUTS},
    }


def format_row(row: Mapping[str, Any]) -> str:
    decode = " | ".join(f"{row['seconds']['decode'][name] * 1e6:.1f}" for name in LAYERS)
    prefill = " | ".join(f"{row['seconds']['prefill'][name] * 1e3:.2f}" for name in LAYERS)
    size = " | ".join(f"{row['bytes']['bfloat16'][name] / 2**20:.3f}" for name in LAYERS)
    errors = " | ".join(
        "/".join(f"{row['relative_error'][dtype][name]:.1e}" for name in FACTORIZED)
        for dtype in STORAGE_DTYPES
    )
    faster = "/".join(row["faster_variant"][input_name] for input_name in INPUTS)
    return (f"| {row['modules']} | {row['out_features']}x{row['in_features']} | {row['rank']} ({row['rank_label']}) | "
            f"{decode} | {prefill} | {size} | {errors} | {row['auto_variant']} | {faster} |")


TABLE_HEADER = (
    "| modules | out x in | rank | decode µs dense | plain | col | row | prefill ms dense | plain | col | row "
    "| bf16 MiB dense | plain | col | row | rel. err fp32 plain/col/row | bf16 plain/col/row | auto | faster dec/pre |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"
)

LEGEND = (
    "Float32 forward times, median over round-robin repeats (decode: 1 token, prefill: {tokens} tokens); "
    "`col`/`row` are the two PivGa variants, `auto` the one `choose_variant` picks, `faster` the one measured "
    "faster (decode/prefill). Sizes are state-dict bytes with float weights in bfloat16 and int32 permutations. "
    "Errors are ‖W_stored − AB‖_F / ‖AB‖_F of the numbers stored in float32/bfloat16 against float64 plain factors "
    "(estimated with {probes} Gaussian probes); the plain factors' own rounding error is the reference."
)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Summary", ""]
    for dtype in STORAGE_DTYPES:
        worst = {name: max(row["relative_error"][dtype][name] for row in rows) for name in FACTORIZED}
        lines.append(f"- max relative error, {dtype}: " + ", ".join(f"{name} {value:.2e}" for name, value in worst.items()))
    lines.append(f"- max |T| after maxvol: {max(max(row['max_abs_coeff'].values()) for row in rows):.6f}")
    for input_name in INPUTS:
        agree = sum(row["faster_variant"][input_name] == row["auto_variant"] for row in rows)
        ratios = [row["seconds"][input_name][f"pivga_{row['auto_variant']}"] / row["seconds"][input_name]["plain"]
                  for row in rows]
        lines.append(f"- {input_name}: auto variant is the faster one in {agree}/{len(rows)} cases; "
                     f"time(auto PivGa) / time(plain) median {statistics.median(ratios):.3f}, "
                     f"range {min(ratios):.3f}-{max(ratios):.3f}")
    convert = max(max(row["convert_seconds"].values()) for row in rows)
    lines.append(f"- slowest gauge fixing (float64): {convert:.2f} s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: SmolLM2 shapes, 25%%/75%%/break-even ranks, short timings")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pivga_layers"),
                        help="output path without suffix; writes .json and .md")
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SHAPES), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--error-probes", type=int, default=256, help="random inputs estimating the errors")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["SmolLM2-135M"] if args.quick else list(MODEL_SHAPES))
    fractions = (0.25, 0.75) if args.quick else RANK_FRACTIONS
    args.min_rounds, args.max_rounds, args.budget_seconds = (3, 50, 0.05) if args.quick else (5, 2000, 0.5)

    rows = []
    load_before = os.getloadavg()[0]  # other jobs on the CPU make every timing slower: recorded, not hidden
    started = time.perf_counter()
    print(TABLE_HEADER)
    for model in models:
        for modules, m, n in MODEL_SHAPES[model]:
            dense = nn.Linear(n, m, bias=False).requires_grad_(False)  # timing only: values are irrelevant
            points = rank_points(m, n, fractions)
            for label, rank in points.items():
                rows.append(measure(model, f"{model} {modules}", dense, label, rank, max(points.values()), args))
                print(format_row(rows[-1]), flush=True)
    elapsed = time.perf_counter() - started

    environment = {"command": " ".join(["python", "benchmarks/pivga_layers.py", *sys.argv[1:]]),
                   "load_average_1min_before": load_before, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "python": platform.python_version(),
                   "machine": platform.machine(), "processor": platform.processor(), "quick": args.quick,
                   "prefill_tokens": args.prefill_tokens, "seed": args.seed, "elapsed_seconds": elapsed}
    lines = summary(rows)
    print("\n".join(["", *lines]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    markdown = ["# PivGa layer benchmark", "", LEGEND.format(tokens=args.prefill_tokens, probes=args.error_probes), "",
                "```", json.dumps(environment, indent=2), "```", "", TABLE_HEADER, *map(format_row, rows), "", *lines, ""]
    args.out.with_suffix(".md").write_text("\n".join(markdown))
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
