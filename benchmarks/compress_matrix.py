"""Compress a model under a grid of settings and evaluate every cell with the same harness.

Each cell (allocator x factor format x whitening x keep ratio x calibration set) writes one JSON file
to the results folder; finished cells are skipped, so an interrupted run resumes where it stopped.
`make_results.py` turns the folder into RESULTS.md tables and plots.

Example (the SmolLM2 rows of benchmarks/RESULTS.md):
    RANKCUT_DATA=../shared/data python benchmarks/compress_matrix.py --model smollm2-135m \
        --allocators uniform energy --keeps 0.8 0.6 --formats plain pivga --calib wikitext2:validation
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

import rankcut
from rankcut.data import load_text


def parse_eval(spec: str) -> tuple[str, str, int | None]:
    """``name:split[:max_windows]``."""
    parts = spec.split(":")
    return parts[0], parts[1], int(parts[2]) if len(parts) > 2 else None


def evaluate(model, tokenizer, evals: list[str], seqlen: int) -> dict[str, dict]:
    results = {}
    for spec in evals:
        name, split, max_windows = parse_eval(spec)
        corpus = load_text(name, split)
        result = rankcut.evaluate_perplexity(model, tokenizer, corpus, seqlen=seqlen, max_windows=max_windows)
        results[spec] = result.to_dict()
        print(f"    {spec}: ppl {result.perplexity:.3f} over {result.windows} windows ({result.seconds:.0f} s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--allocators", nargs="+", default=["uniform"])
    parser.add_argument("--allocator-options", default="{}", help="JSON: {allocator: {option: value}}")
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.8, 0.6])
    parser.add_argument("--formats", nargs="+", default=["plain"], choices=["plain", "pivga"])
    parser.add_argument("--whitenings", nargs="+", default=["cholesky"])
    parser.add_argument("--calib", nargs="+", default=["wikitext2:validation"], help="dataset:split")
    parser.add_argument("--nsamples", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval", nargs="+", default=["wikitext2:test"], help="dataset:split[:max_windows]")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/smollm2"))
    parser.add_argument("--artifacts", type=Path, help="also save each compressed model here")
    parser.add_argument("--tag", default="", help="suffix for cell names (e.g. an ablation label)")
    parser.add_argument("--spectra-cache", type=Path, help="reuse spectra across cells with the same calibration")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    allocator_options = json.loads(args.allocator_options)
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                   "rankcut": rankcut.__version__}

    if args.dense:
        path = args.results / "dense.json"
        if path.exists():
            print(f"skip dense ({path} exists)")
        else:
            print("dense", flush=True)
            model, tokenizer = rankcut.load_model(args.model)
            result = {"cell": "dense", "model": args.model, "environment": environment,
                      "params": sum(p.numel() for p in model.parameters()),
                      "perplexity": evaluate(model, tokenizer, args.eval, args.eval_seqlen)}
            path.write_text(json.dumps(result, indent=2))
            del model
            gc.collect()

    for calib in args.calib:
        dataset, split = calib.split(":")
        for whitening in args.whitenings:
            for allocator in args.allocators:
                for factor_format in args.formats:
                    for keep in args.keeps:
                        cell = f"{allocator}-{factor_format}-{whitening}-keep{keep:g}-{dataset}{args.tag}"
                        path = args.results / f"{cell}.json"
                        if path.exists():
                            print(f"skip {cell} ({path} exists)")
                            continue
                        print(cell, flush=True)
                        model, tokenizer = rankcut.load_model(args.model)
                        config = rankcut.CompressionConfig(
                            keep_ratio=keep, allocator=allocator, allocator_options=allocator_options.get(allocator, {}),
                            whitening=whitening, factor_format=factor_format,
                            calibration=rankcut.CalibrationConfig(dataset=dataset, split=split,
                                                                  nsamples=args.nsamples, seqlen=args.seqlen))
                        start = time.perf_counter()
                        model, report = rankcut.compress(model, config, tokenizer=tokenizer,
                                                         output_dir=args.results / f"{cell}-files",
                                                         spectra_cache=args.spectra_cache)
                        seconds = time.perf_counter() - start
                        print(f"    compressed in {seconds:.0f} s, {report.measured['target_params']:,} target params", flush=True)
                        result = {"cell": cell, "model": args.model, "environment": environment,
                                  "compress_seconds": seconds, "report": report.to_dict(),
                                  "perplexity": evaluate(model, tokenizer, args.eval, args.eval_seqlen)}
                        if args.artifacts:
                            rankcut.save(model, tokenizer, args.artifacts / cell, report, base_model=args.model, overwrite=True)
                        path.write_text(json.dumps(result, indent=2, default=str))
                        del model
                        gc.collect()


if __name__ == "__main__":
    main()
