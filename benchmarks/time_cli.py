"""Time ``rankcut compress`` as a user runs it: one fresh process that loads the model, calibrates,
compresses and saves. Records the wall time, the process's peak RSS, the run's own report (phase
timings, measured parameters), then the perplexity of the artifact in a second fresh process.

    python benchmarks/time_cli.py --out benchmarks/results/smollm2/cli-....json --artifact DIR \\
        -- --model smollm2-135m --keep 0.8 ...     # everything after -- goes to rankcut compress

With ``--cell``, a ``compress_matrix.py`` cell of the same settings (compressed through the Python API
with the whole model loaded) is the reference: the record says whether the command gave the cell's rank
plan and holds the cell's perplexity over the same windows and its peak, so the streamed command is seen
to change how a model is compressed and not what comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import torch

from rankcut.evaluation.speed import cpu_of_others, processor_name


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def reference(cell: dict, report: dict, spec: str, name: str) -> dict:
    """What the command's run shares with the cell: the rank plan (modules whose rank differs), the
    perplexity over the same windows, and the cell's own peak and time for comparison."""
    ranks, theirs = report["plan"]["ranks"], cell["report"]["plan"]["ranks"]
    return {"cell": name, "same_plan": ranks == theirs,
            "modules_with_another_rank": sorted(m for m in ranks.keys() | theirs.keys() if ranks.get(m) != theirs.get(m)),
            "perplexity": cell["perplexity"][spec]["perplexity"], "peak_bytes": cell["report"]["peak_memory_bytes"],
            "compress_seconds": cell["compress_seconds"],
            "calibrate_seconds": cell["report"]["timings"].get("calibrate + decompose", 0.0),  # ~0: cached spectra
            "cpu": cell.get("environment", {}).get("cpu")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--artifact", type=Path, required=True, help="where rankcut compress writes (overwritten)")
    parser.add_argument("--eval", default="wikitext2:test:100", help="DATASET:SPLIT:WINDOWS for the perplexity check")
    parser.add_argument("--cell", type=Path, help="compress_matrix cell JSON of the same settings to compare with")
    parser.add_argument("compress_args", nargs=argparse.REMAINDER, help="-- then the rankcut compress options")
    args = parser.parse_args(argv)
    compress_args = [a for a in args.compress_args if a != "--"]
    if args.eval.count(":") != 2:
        parser.error(f"--eval is DATASET:SPLIT:WINDOWS, got {args.eval!r}")
    if any(a == "--out" or a.startswith("--out=") for a in compress_args):
        parser.error("give the artifact folder with --artifact, not --out after --")
    cell = json.loads(args.cell.read_text()) if args.cell else None
    if cell is not None and args.eval not in cell["perplexity"]:
        parser.error(f"{args.cell} has no {args.eval} perplexity to compare with; it has {sorted(cell['perplexity'])}")
    executable = shutil.which("rankcut")
    if executable is None:
        parser.error("the rankcut command is not on PATH; pip install -e . first")

    args.out.parent.mkdir(parents=True, exist_ok=True)  # the perplexity check writes beside it
    with cpu_of_others() as others:
        wall = run([executable, "compress", *compress_args, "--out", str(args.artifact), "--overwrite"])
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB; the only child so far
    report = json.loads((args.artifact / "rankcut_report.json").read_text())

    dataset, split, windows = args.eval.split(":")
    ppl_json = args.out.with_suffix(".ppl.tmp.json")
    run([executable, "ppl", "--model", str(args.artifact), "--dataset", dataset, "--split", split,
         "--seqlen", str(report["config"]["calibration"]["seqlen"]), "--max-windows", windows, "--json", str(ppl_json)])
    perplexity = json.loads(ppl_json.read_text())
    ppl_json.unlink()
    perplexity["model"] = args.artifact.name  # the folder name: where it lives is machine-specific

    result = {
        "command": " ".join(["rankcut", "compress", *compress_args]),  # the output folder is machine-specific
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)), "cpu": processor_name()},
        "wall_seconds": wall,
        "others_cpu_cores": others.get("cores"),  # what other processes used meanwhile: ~0 when it ran alone
        "process_peak_rss_bytes": peak_rss,
        "timings": report["timings"],
        "memory": report["memory"],
        "measured": report["measured"],
        "perplexity": perplexity,
    }
    if cell is not None:
        result["reference"] = reference(cell, report, args.eval, args.cell.stem)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"rankcut compress: {wall:.1f} s wall, peak RSS {peak_rss / 2**30:.2f} GiB; "
          f"{dataset} {split} ppl over {windows} windows: {perplexity['perplexity']:.4f}")
    if cell is not None:
        print(f"against {args.cell.stem}: same plan {result['reference']['same_plan']}, its perplexity "
              f"{result['reference']['perplexity']:.4f}, its peak {result['reference']['peak_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
