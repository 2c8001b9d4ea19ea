"""Build benchmarks/RESULTS.md (tables + plots) from the JSON cells of compress_matrix.py.

    python benchmarks/make_results.py --results benchmarks/results/smollm2 --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rankcut.plan import RankPlan
from rankcut.plots import plot_pareto, plot_ranks


def load_cells(folder: Path) -> tuple[dict | None, list[dict]]:
    dense, cells = None, []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("cell") == "dense":
            dense = data
        elif "report" in data:
            cells.append(data)
    return dense, cells


def ppl(cell: dict, spec: str) -> str:
    value = cell.get("perplexity", {}).get(spec)
    return f"{value['perplexity']:.2f}" if value else "–"


def table(dense: dict | None, cells: list[dict], specs: list[str]) -> list[str]:
    header = ["allocator", "format", "whitening", "calibration", "keep", "target params", "achieved keep",
              *[f"ppl {s}" for s in specs], "compress s", "allocate s", "peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if dense:
        lines.append("| dense | – | – | – | 1.0 | – | 1.0 | " + " | ".join(ppl(dense, s) for s in specs) + " | – | – | – |")
    key = lambda c: (c["report"]["config"]["calibration"]["dataset"], c["report"]["config"]["whitening"],
                     -c["report"]["config"]["keep_ratio"], c["report"]["config"]["factor_format"],
                     c["report"]["config"]["allocator"])
    for cell in sorted(cells, key=key):
        report, config = cell["report"], cell["report"]["config"]
        measured = report["measured"]
        lines.append("| " + " | ".join([
            config["allocator"], config["factor_format"], config["whitening"],
            f"{config['calibration']['dataset']} {config['calibration']['nsamples']}x{config['calibration']['seqlen']}",
            f"{config['keep_ratio']:g}", f"{measured['target_params']:,}", f"{measured['target_keep_ratio']:.4f}",
            *[ppl(cell, s) for s in specs], f"{cell['compress_seconds']:.0f}",
            f"{report['timings'].get('allocate', 0):.1f}", f"{report['peak_memory_bytes'] / 2**30:.2f}",
        ]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/smollm2"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--title", default="SmolLM2-135M")
    parser.add_argument("--command", default="", help="the command that produced the cells, recorded in the page")
    args = parser.parse_args()
    dense, cells = load_cells(args.results)
    specs = sorted({s for c in cells + ([dense] if dense else []) for s in c.get("perplexity", {})})
    lines = [f"# Results: {args.title}", "", "Produced by `benchmarks/compress_matrix.py`, tabulated by "
             "`benchmarks/make_results.py`; every figure is measured on the 2-core CPU machine. `compress s` includes "
             "calibration only for the first cell of a calibration set: later cells reuse its spectra (`--spectra-cache`). "
             "Cells timed while other jobs shared the CPU are slower than the machine can do.", ""]
    if args.command:
        lines += ["```bash", args.command, "```", ""]
    lines += table(dense, cells, specs) + [""]
    figures = args.out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        points = [(f"{c['report']['config']['allocator']}/{c['report']['config']['factor_format']}/"
                   f"{c['report']['config']['whitening']}/{c['report']['config']['calibration']['dataset']}",
                   c["report"]["config"]["keep_ratio"], c["perplexity"][spec]["perplexity"])
                  for c in cells if spec in c.get("perplexity", {})]
        if points:
            name = f"pareto-{args.results.name}-{spec.replace(':', '-')}.png"
            plot_pareto(points, figures / name, dense=dense["perplexity"][spec]["perplexity"] if dense and spec in dense.get("perplexity", {}) else None,
                        ylabel=f"perplexity {spec}")
            lines += [f"![perplexity against keep ratio, {spec}](figures/{name})", ""]
    plans = {c["cell"]: RankPlan.from_dict(c["report"]["plan"]) for c in cells
             if c["report"]["config"]["allocator"] != "uniform"}
    if plans:
        name = f"ranks-{args.results.name}.png"
        plot_ranks(dict(list(plans.items())[:4]), figures / name)
        lines += [f"![ranks per layer and module type](figures/{name})", ""]
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
