"""Time ``rankcut compress`` as a user runs it: one fresh process that loads the model, calibrates,
compresses and saves. Records the wall time, the process's peak RSS, the run's own report (phase
timings, measured parameters), then the perplexity of the artifact in a second fresh process.

    python benchmarks/time_cli.py --out benchmarks/results/smollm2/cli-....json --artifact DIR \\
        -- --model smollm2-135m --keep 0.8 ...     # everything after -- goes to rankcut compress
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


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--artifact", type=Path, required=True, help="where rankcut compress writes (overwritten)")
    parser.add_argument("--eval", default="wikitext2:test:100", help="DATASET:SPLIT:WINDOWS for the perplexity check")
    parser.add_argument("compress_args", nargs=argparse.REMAINDER, help="-- then the rankcut compress options")
    args = parser.parse_args(argv)
    compress_args = [a for a in args.compress_args if a != "--"]
    if args.eval.count(":") != 2:
        parser.error(f"--eval is DATASET:SPLIT:WINDOWS, got {args.eval!r}")
    if any(a == "--out" or a.startswith("--out=") for a in compress_args):
        parser.error("give the artifact folder with --artifact, not --out after --")
    executable = shutil.which("rankcut")
    if executable is None:
        parser.error("the rankcut command is not on PATH; pip install -e . first")

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
                        "machine": platform.machine(), "cpus": len(os.sched_getaffinity(0))},
        "wall_seconds": wall,
        "process_peak_rss_bytes": peak_rss,
        "timings": report["timings"],
        "memory": report["memory"],
        "measured": report["measured"],
        "perplexity": perplexity,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"rankcut compress: {wall:.1f} s wall, peak RSS {peak_rss / 2**30:.2f} GiB; "
          f"{dataset} {split} ppl over {windows} windows: {perplexity['perplexity']:.4f}")


if __name__ == "__main__":
    main()
