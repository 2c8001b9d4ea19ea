"""Build benchmarks/RESULTS.md (tables + plots) from the JSON cells of compress_matrix.py.

One section per results folder (one model each): a summary table of every cell and the dense row,
then zero-shot accuracy per task, speed and memory, and compression details where the cells have
them, then plots. Figures a cell lacks show as "—".

    python benchmarks/make_results.py --results benchmarks/results/smollm2 --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rankcut import CompressionConfig
from rankcut.allocation import create_allocator
from rankcut.evaluation.speed import SHARED_CPU_CORES
from rankcut.evaluation.zeroshot import task_average
from rankcut.plan import RankPlan
from rankcut.plots import plot_pareto, plot_ranks

# The closed-loop part of a cell's name, as compress_matrix.py writes it (-compensate0.5-anchor1-refine32,
# -correct2-step0.5-windows128-refine32-lr0.001, -refine32 after the open loop).
REFINE_SUFFIX = r"-refine\d+(?:-lr[\d.]+(?:e-\d+)?)?"
CLOSED_LOOP_SUFFIX = re.compile(rf"^-(?:sequential|correct\d*(?:-step[\d.]+)?(?:-windows\d+)?(?:{REFINE_SUFFIX})?"
                                rf"|compensate[\d.]*(?:-anchor[\d.]+)?(?:{REFINE_SUFFIX})?|{REFINE_SUFFIX[1:]})")
MISSING = "—"
# Zero-shot figures over fewer items per task than this are not shown: at 25 items a task's accuracy
# swings by ±0.1 and the dense model averaged below compressed ones (issue 21). `main` sets the figure in
# use from --min-zeroshot-items.
DEFAULT_MIN_ZEROSHOT_ITEMS = 500
min_zeroshot_items = DEFAULT_MIN_ZEROSHOT_ITEMS
# Perplexity columns always shown, in this order; other (dataset, split) pairs found get columns after them.
PPL_COLUMNS = {("wikitext2", "test"): "WikiText-2 test ppl", ("c4", "validation"): "C4 ppl"}


def load_cells(folder: Path) -> tuple[dict | None, list[dict]]:
    dense, cells = None, []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("cell") == "dense":
            dense = data
        elif "report" in data:
            cells.append(data)
    return dense, cells


def fmt(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**30


def render(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def perplexities(row: dict, dataset: str, split: str) -> dict[int, float]:
    """The row's perplexities on ``dataset``/``split`` by number of windows evaluated (the first ones)."""
    return {e["windows"]: e["perplexity"] for e in row.get("perplexity", {}).values()
            if (e["dataset"], e["split"]) == (dataset, split)}


def zeroshot_summary(row: dict) -> tuple[float, float | None, tuple[str, ...], int | None] | None:
    """Mean acc over the tasks the row has, its standard error, those tasks and the item limit per task;
    None when the row has none, or when its limit is under ``min_zeroshot_items``."""
    zeroshot = row.get("zeroshot")
    if not zeroshot or (zeroshot["limit"] is not None and zeroshot["limit"] < min_zeroshot_items):
        return None
    tasks = {task: m for task, m in zeroshot["tasks"].items() if "acc" in m}
    if not tasks:
        return None
    mean, stderr = task_average(tasks)
    return mean, stderr, tuple(sorted(tasks)), zeroshot["limit"]


def accuracy_text(summary: tuple | None, references: Sequence[tuple[str, tuple | None]] = (),
                  common: tuple | None = None) -> str:
    """``mean ± stderr``, with ``(≈ name)`` for each ``(name, summary)`` reference over the same tasks and
    limit whose mean it differs from by less than twice their combined standard error: no significant
    difference. A summary over other tasks or another limit than ``common`` says which."""
    if summary is None:
        return MISSING
    mean, stderr = summary[:2]
    text = f"{mean:.4f}" if stderr is None else f"{mean:.4f} ± {stderr:.4f}"
    alike = [name for name, reference in references
             if reference is not None and reference is not summary and reference[2:] == summary[2:]
             and None not in (stderr, reference[1]) and abs(mean - reference[0]) < 2 * math.hypot(stderr, reference[1])]
    text += f" (≈ {', ≈ '.join(alike)})" if alike else ""
    if common is not None and summary[2:] != common:
        text += f" ({len(summary[2])} tasks, {limit_text(summary[3])})"
    return text


def most_common_zeroshot(summaries: Iterable[tuple | None]) -> tuple | None:
    """The (tasks, limit) most rows were evaluated on: the setting the others are flagged against."""
    counts = Counter(s[2:] for s in summaries if s is not None).most_common(1)
    return counts[0][0] if counts else None


def speed_text(row: dict, key: str) -> str:
    """The compressed/dense ratio: the median over interleaved rounds with its range, or "no measurable
    difference" where the range includes 1. A single measurement's ratio (cells measured before the
    rounds) is not shown: on 2 cores one run's ratio swung by ±0.3 between models of one size."""
    ratio = row.get("speed_ratio", {})
    value, span = ratio.get(key), ratio.get(f"{key}_range")
    if value is None or span is None:
        return MISSING
    low, high = span
    if low <= 1.0 <= high:
        return f"no measurable difference ({low:.2f}–{high:.2f})"
    return f"{value:.2f} ({low:.2f}–{high:.2f})"


def limit_text(limit: int | None) -> str:
    return "all items" if limit is None else f"first {limit} items per task"


def setting(cell: dict) -> tuple[str, str, float, str]:
    """What a cell shares with its uniform reference: format, whitening, keep, calibration set."""
    config = cell["report"]["config"]
    return config["factor_format"], config["whitening"], config["keep_ratio"], config["calibration"]["dataset"]


def tag(cell: dict) -> str:
    """The suffix of the cell's name after its setting: the closed-loop part, then the ``--tag`` (an ablation
    label); "" for the allocator's default open-loop cell."""
    config = cell["report"]["config"]
    factor_format, whitening, keep, dataset = setting(cell)
    return cell["cell"].removeprefix(f"{config['allocator']}-{factor_format}-{whitening}-keep{keep:g}-{dataset}")


def allocator_tag(cell: dict) -> str:
    """The ``--tag`` alone: a closed-loop cell of a tagged allocator (ARA ``-epoch1-lr0.15`` + compensate)
    belongs with that allocator's open-loop cell of the same tag."""
    return CLOSED_LOOP_SUFFIX.sub("", tag(cell), count=1)


def closed_loop(cell: dict) -> tuple[str, int]:
    """The cell's closed-loop mode (``compensate 0.5`` for a blended compensating fit) and refinement steps
    (cells from before version 2 configs: a flag)."""
    config = cell["report"]["config"]
    mode = config.get("closed_loop") or ("sequential" if config.get("sequential") else "none")
    if config.get("compensation", 1.0) != 1.0:
        mode += f" {config['compensation']:g}"
    if config.get("anchor", 0.0):
        mode += f" anchor {config['anchor']:g}"
    if config.get("correction_rounds", 1) != 1:
        mode += f" {config['correction_rounds']} rounds"
    if config.get("closed_loop") == "correct" and config.get("correction_step", 1.0) != 1.0:
        mode += f" step {config['correction_step']:g}"
    # cells from before the option took 32 windows; the name, as compress_matrix's, differs from the default
    if config.get("closed_loop") == "correct" \
            and config.get("correction_windows", 32) != CompressionConfig.correction_windows:
        mode += f" {config['correction_windows']} windows"
    return mode, config.get("refine_steps", 0)


def refinement(cell: dict) -> str:
    """``refine N`` for a cell with N refinement steps (with its lr where it is not today's default), else ''."""
    config = cell["report"]["config"]
    if not config.get("refine_steps", 0):
        return ""
    lr = "" if config["refine_lr"] == CompressionConfig.refine_lr else f" lr {config['refine_lr']:g}"
    return f"refine {config['refine_steps']}{lr}"


def label(cell: dict) -> list[str]:
    """allocator (with its tag), format, whitening, keep, calibration."""
    config = cell["report"]["config"]
    calib = config["calibration"]
    allocator = config["allocator"] + (f" `{tag(cell)}`" if tag(cell) else "")
    return [allocator, config["factor_format"], config["whitening"], f"{config['keep_ratio']:g}",
            f"{calib['dataset']} {calib['nsamples']}x{calib['seqlen']}"]


def untagged_cell(cells: list[dict], allocator: str, cell_setting: tuple) -> dict | None:
    """The allocator's default (untagged) cell at that format, whitening, keep and calibration set."""
    return next((c for c in cells if c["report"]["config"]["allocator"] == allocator and not tag(c)
                 and setting(c) == cell_setting), None)


def shared_wikitext_perplexities(rows: list[dict | None]) -> list[float] | None:
    """Each row's WikiText-2 test perplexity over the most windows all of them were measured on."""
    if None in rows:
        return None
    by_windows = [perplexities(r, "wikitext2", "test") for r in rows]
    common = set.intersection(*(set(w) for w in by_windows))
    return [w[max(common)] for w in by_windows] if common else None


def gap_closed(row: dict, cells: list[dict], dense: dict | None) -> float | None:
    """``(uniform − ppl) / (uniform − dense)`` on WikiText-2 test against the uniform cell of the same
    setting, over the most windows all three were measured on: the share of uniform's loss recovered."""
    figures = shared_wikitext_perplexities([row, untagged_cell(cells, "uniform", setting(row)), dense])
    if figures is None:
        return None
    mine, uniform, full = figures
    return (uniform - mine) / (uniform - full) if uniform != full else None


def sort_key(cell: dict) -> tuple:
    config = cell["report"]["config"]
    return (config["calibration"]["dataset"], config["whitening"], -config["keep_ratio"], config["factor_format"],
            config["allocator"], tag(cell))


def reproduce_command(cell: dict) -> str:
    """The `rankcut compress` command line that makes the cell's model."""
    config = cell["report"]["config"]
    calibration = config["calibration"]
    mode, steps = closed_loop(cell)
    parts = [f"rankcut compress --model {cell['model']} --keep {config['keep_ratio']:g} --allocator {config['allocator']}",
             f"--format {config['factor_format']} --whitening {config['whitening']} --calib {calibration['dataset']}",
             f"--calib-split {calibration['split']} --nsamples {calibration['nsamples']} --seqlen {calibration['seqlen']}"]
    # the options the plan was made with that differ from today's defaults (options since removed, which
    # only traded memory for time, cannot be passed)
    defaults = create_allocator(config["allocator"]).config.to_dict()
    used = cell["report"]["plan"].get("allocator_config") or config["allocator_options"]
    parts += [f"-a {key}={value if isinstance(value, str) else json.dumps(value)}"
              for key, value in used.items() if key in defaults and defaults[key] != value]
    loop = mode.split(" ")[0]
    if loop != CompressionConfig(whitening=config["whitening"]).closed_loop:  # today's default differs
        parts.append(f"--closed-loop {loop}")
    if config.get("compensation", 1.0) != 1.0:
        parts.append(f"--compensation {config['compensation']:g}")
    if config.get("closed_loop") == "compensate" and config.get("anchor", 0.0) != 1.0:  # the CLI default there: 1
        parts.append(f"--anchor {config.get('anchor', 0.0):g}")
    if steps:
        parts.append(f"--refine-steps {steps} --refine-lr {config['refine_lr']:g}")
    if config.get("correction_rounds", 1) != 1:
        parts.append(f"--correction-rounds {config['correction_rounds']}")
    if loop == "correct" and config.get("correction_step", 1.0) != CompressionConfig.correction_step:
        parts.append(f"--correction-step {config.get('correction_step', 1.0):g}")
    if loop == "correct" and config.get("correction_windows", 32) != CompressionConfig.correction_windows:
        parts.append(f"--correction-windows {config['correction_windows']}")
    return " ".join(parts)


CALIBRATION_PHASE = "calibrate + decompose"
CACHED_SECONDS = 10.0  # a cell whose calibration phase took less read cached spectra


def compress_seconds_text(row: dict) -> str:
    """The cell's compression seconds, marked § where other processes used the CPU meanwhile (measured
    for cells compressed since 2026-12-06)."""
    shared = (row.get("compress_others_cpu_cores") or 0.0) >= SHARED_CPU_CORES
    return f"{row['compress_seconds']:.0f}" + ("§" if shared else "")


def calibration_seconds(cell: dict, cells: list[dict]) -> float | None:
    """For a cell that read cached spectra: the calibration time of the fastest cell that computed spectra
    with its whitening and calibration data (None when it computed its own, or no such cell is here)."""
    if cell["report"]["timings"].get(CALIBRATION_PHASE, 0.0) >= CACHED_SECONDS:
        return None
    config = cell["report"]["config"]
    times = [c["report"]["timings"][CALIBRATION_PHASE] for c in cells
             if c["report"]["timings"].get(CALIBRATION_PHASE, 0.0) >= CACHED_SECONDS
             and (c["report"]["config"]["whitening"], c["report"]["config"]["calibration"])
             == (config["whitening"], config["calibration"])]
    return min(times, default=None)


def headline_table(dense: dict | None, cells: list[dict]) -> list[str]:
    """Dense and, per keep ratio, the best pipeline: the lowest WikiText-2 test perplexity over the most
    windows any cell of that keep ratio was measured on (the full split where one was), with what it
    costs and the command that makes it; above it, uniform truncation at the same setting for reference."""
    keeps = sorted({c["report"]["config"]["keep_ratio"] for c in cells}, reverse=True)
    rows: list[tuple[dict, str]] = [(dense, "")] if dense else []  # (row, role)
    for keep in keeps:
        group = [c for c in cells if c["report"]["config"]["keep_ratio"] == keep and perplexities(c, "wikitext2", "test")]
        if group:
            windows = max(w for c in group for w in perplexities(c, "wikitext2", "test"))
            measured = [c for c in group if windows in perplexities(c, "wikitext2", "test")]
            best = min(measured, key=lambda c: perplexities(c, "wikitext2", "test")[windows])
            uniform = untagged_cell(cells, "uniform", setting(best))
            if uniform is not None and uniform is not best:
                rows.append((uniform, "reference"))
            rows.append((best, "best"))
    if len(rows) <= (1 if dense else 0):
        return []
    summaries = {id(row): zeroshot_summary(row) for row, _ in rows}
    common = most_common_zeroshot(summaries.values())

    def ppl(row: dict, dataset: str, split: str) -> str:
        figures = perplexities(row, dataset, split)
        return f"{figures[max(figures)]:.2f} ({max(figures)})" if figures else MISSING

    body = []
    for index, (row, role) in enumerate(rows):
        references = [("dense", summaries[id(dense)])] if dense else []
        if row is dense:
            pipeline, keep, params, size, seconds, peak, command = "dense", "1", MISSING, MISSING, MISSING, MISSING, MISSING
            if "speed" in row:
                size = f"{row['speed']['weight_bytes'] / 2**20:.0f}"
        else:
            config, measured = row["report"]["config"], row["report"]["measured"]
            mode = closed_loop(row)[0]
            pipeline = " + ".join([config["allocator"] + (f" `{allocator_tag(row)}`" if allocator_tag(row) else ""),
                                   *([f"closed loop {mode}"] if mode != "none" else []),
                                   *filter(None, [refinement(row)]), config["factor_format"]])
            if role == "reference":
                pipeline += " (reference)"
            elif index and rows[index - 1][1] == "reference":
                references.append(("uniform", summaries[id(rows[index - 1][0])]))
            keep = f"{config['keep_ratio']:g}"
            params, size = f"{measured['model_params']:,}", f"{measured['weight_bytes'] / 2**20:.0f}"
            seconds, peak = compress_seconds_text(row), f"{row['report']['peak_memory_bytes'] / 2**30:.2f}"
            if (calibration := calibration_seconds(row, cells)) is not None:
                seconds += f" + {calibration:.0f}‡"
            command = f"`{reproduce_command(row)}`"
        body.append([pipeline, keep, ppl(row, "wikitext2", "test"), ppl(row, "c4", "validation"),
                     accuracy_text(summaries[id(row)], references, common), params, size, seconds, peak,
                     "1.00" if row is dense else speed_text(row, "prefill_speedup"),
                     "1.00" if row is dense else speed_text(row, "decode_speedup"), command])
    return [*render(["pipeline", "keep", "WikiText-2 test ppl (windows)", "C4 ppl (windows)", "zero-shot avg acc",
                     "parameters", "weights MiB", "compress s", "peak GiB", "prefill ×dense", "decode ×dense",
                     "command"], body),
            "", "The best pipeline of a keep ratio has the lowest WikiText-2 test perplexity over the most windows any "
            "cell of that ratio was measured on (the full split, where one was); C4 over its windows; the rest of the "
            "page holds every cell. `compress s`: the whole compression; ‡ marks a cell that read cached spectra, "
            "with the calibration time of the fastest cell that computed them added. `(reference)`: uniform truncation with the best pipeline's format and "
            "calibration, open loop. Zero-shot: mean over the tasks ± its standard error; `(≈ dense)`, `(≈ uniform)`: "
            "within twice the combined standard error of that row's over the same tasks and items, no significant "
            "difference; a row over other tasks or items than most says which. A command gives the row's "
            "settings to today's code: rows measured before a method changed (the README's results section says "
            "which) need not come out the same.", ""]


def summary_table(dense: dict | None, cells: list[dict]) -> list[str]:
    """The main table: one row per cell plus the dense row, with notes on how to read it."""
    rows = ([dense] if dense else []) + cells
    measured = {(e["dataset"], e["split"], e["windows"]) for r in rows for e in r.get("perplexity", {}).values()}
    order = list(PPL_COLUMNS)
    triples = sorted(measured, key=lambda t: (order.index(t[:2]) if t[:2] in order else len(order), t[:2], -t[2]))
    ppl_columns = {t: f"{PPL_COLUMNS.get(t[:2], f'{t[0]} {t[1]} ppl')}, {t[2]} windows" for t in triples}
    zeroshot = {id(r): s for r in rows if (s := zeroshot_summary(r))}
    common = most_common_zeroshot(zeroshot.values())

    def ppl(row: dict, triple: tuple[str, str, int]) -> str:
        return fmt(perplexities(row, *triple[:2]).get(triple[2]), ".2f")

    def accuracy(row: dict) -> str:
        return accuracy_text(zeroshot.get(id(row)), [("dense", zeroshot.get(id(dense)) if dense else None)], common)

    def speedup(row: dict, key: str) -> str:
        if row is dense:
            return "1.00" if "speed" in row else MISSING
        return speed_text(row, key)

    header = ["allocator", "format", "whitening", "keep", "calib", *ppl_columns.values(), "gap closed",
              "zero-shot avg acc", "compress s", "allocate s", "peak GiB", "prefill ×dense", "decode ×dense",
              "measured keep"]
    body = []
    for row in rows:
        if row is dense:
            labels, seconds, allocate, keep = ["dense", MISSING, MISSING, "1", MISSING], MISSING, MISSING, "1"
            peak = MISSING
        else:
            labels, seconds = label(row), compress_seconds_text(row)
            allocate = fmt(row["report"]["timings"].get("allocate"), ".1f")
            peak = f"{row['report']['peak_memory_bytes'] / 2**30:.2f}" + ("" if "memory" in row["report"] else "†")
            keep = f"{row['report']['measured']['target_keep_ratio']:.4f}"
        uniform = row is dense or row["report"]["config"]["allocator"] == "uniform"
        closed = MISSING if uniform else fmt(gap_closed(row, cells, dense), ".0%")
        body.append([*labels, *(ppl(row, p) for p in ppl_columns), closed, accuracy(row), seconds, allocate, peak,
                     speedup(row, "prefill_speedup"), speedup(row, "decode_speedup"), keep])
    notes = ["`compress s` is the whole `rankcut.compress` call, `allocate s` the allocator's share of it. "
             "Perplexities are over the first N windows of 512 tokens of each split. `gap closed`: "
             "(uniform − ppl) / (uniform − dense) on WikiText-2 test against the uniform row of the same format, "
             "whitening, keep and calibration, over the most windows all three were measured on. `peak GiB`: peak "
             "resident memory during the `rankcut.compress` call (model included; the Compression table's `held at "
             "start GiB`, where recorded, is the RSS when the call began: the loaded model plus what earlier cells "
             "of the same process left with the allocator); † marks cells measured before "
             "reports scoped it to the call (commit f033b57): theirs is the peak of the whole process up to then, "
             "an upper bound when cells run before it in the same process peaked higher."]
    if common:
        caveat = "" if common[1] is None else "; with a limit, accuracies are indicative, not comparable with full sets"
        notes.append(f"Zero-shot: mean `acc` over {len(common[0])} tasks ({', '.join(common[0])}), "
                     f"{limit_text(common[1])}{caveat}, ± its standard error (lm-eval's per task, combined); "
                     "`(≈ dense)`: within twice the combined standard error of the dense model's, no significant "
                     "difference. Rows over other tasks or limits say so.")
    notes.append(f"Zero-shot figures over fewer than {min_zeroshot_items} items per task are not shown: they cannot "
                 "separate the methods.")
    if any("speed" in r for r in rows):
        notes.append("`prefill ×dense` / `decode ×dense`: the compressed model's tokens/s over the dense model's "
                     "(512-token prompt, batch-1 decode), each measured in a fresh process: the median ratio over "
                     "interleaved rounds with its range; a range that includes 1 is no measurable difference. Cells "
                     "measured once, before the rounds, show no ratio (the Speed and memory table keeps their "
                     "tokens/s): one run's ratio cannot separate the methods.")
    return render(header, body) + [line for note in notes for line in ("", note)]


def ablation_tables(cells: list[dict]) -> list[str]:
    """Per allocator and setting with ``--tag`` variants: the default cell and each variant, with the change in
    perplexity against the default over the windows both were measured on."""
    lines = []
    variants = [c for c in cells if tag(c) and closed_loop(c) == ("none", 0)]
    groups = {(c["report"]["config"]["allocator"], setting(c)) for c in variants}
    for allocator, cell_setting in sorted(groups):
        default = untagged_cell(cells, allocator, cell_setting)
        members = [c for c in variants if c["report"]["config"]["allocator"] == allocator
                   and setting(c) == cell_setting]
        group = ([default] if default else []) + sorted(members, key=tag)
        windows = {p: set.intersection(*(set(perplexities(c, *p)) for c in group)) for p in PPL_COLUMNS}
        body = []
        for cell in group:
            figures = {p: perplexities(cell, *p) for p in PPL_COLUMNS}
            shown = [fmt(figures[p][max(windows[p])] if windows[p] else None, ".2f") for p in PPL_COLUMNS]
            shared = shared_wikitext_perplexities([cell, default]) if cell is not default else None
            options = {k: v for k, v in cell["report"]["config"]["allocator_options"].items()
                       if default is None or v != default["report"]["config"]["allocator_options"].get(k)}
            body.append([f"`{tag(cell)}`" if tag(cell) else "default",
                         ", ".join(f"{k}={v}" for k, v in options.items()) if cell is not default else MISSING,
                         *shown, f"{shared[0] - shared[1]:+.2f}" if shared else MISSING,
                         fmt(cell["report"]["timings"].get("allocate"), ".0f")])
        headers = [f"{PPL_COLUMNS[p]}, {max(windows[p])} windows" if windows[p] else PPL_COLUMNS[p]
                   for p in PPL_COLUMNS]
        factor_format, whitening, keep, dataset = cell_setting
        lines += [f"### Ablation: {allocator}, {factor_format}, {whitening}, keep {keep:g}, {dataset} calibration",
                  "", *render(["variant", "options changed", *headers, "Δ WikiText-2 vs default", "allocate s"],
                              body), ""]
    return lines


def closed_loop_tables(cells: list[dict]) -> list[str]:
    """Per allocator and setting with closed-loop cells: the open-loop cell, then each closed-loop mode (and
    refinement step count), with the change in perplexity against open loop over the windows all share, the
    blocks whose refined factors were kept, and the time factorization took (where the levers cost)."""
    lines = []
    looped = [c for c in cells if closed_loop(c) != ("none", 0)]
    order = {"none": 0, "sequential": 1, "compensate": 2, "correct": 3}
    groups = {(c["report"]["config"]["allocator"], allocator_tag(c), setting(c)) for c in looped}
    for allocator, variant, cell_setting in sorted(groups):
        def member(cell: dict) -> bool:
            return (cell["report"]["config"]["allocator"], setting(cell)) == (allocator, cell_setting)
        open_loop = next((c for c in cells if member(c) and tag(c) == variant), None)
        members = sorted((c for c in looped if member(c) and allocator_tag(c) == variant),
                         key=lambda c: (order[closed_loop(c)[0].split()[0]], closed_loop(c)))
        group = ([open_loop] if open_loop else []) + members
        windows = {p: set.intersection(*(set(perplexities(c, *p)) for c in group)) for p in PPL_COLUMNS}
        wikitext = ("wikitext2", "test")
        body = []
        for cell in group:
            mode = closed_loop(cell)[0]
            figures = {p: perplexities(cell, *p) for p in PPL_COLUMNS}
            shown = [fmt(figures[p][max(windows[p])] if windows[p] else None, ".2f") for p in PPL_COLUMNS]
            # the change over the column's windows, those every row of the table shares
            shared = ([perplexities(c, *wikitext)[max(windows[wikitext])] for c in (cell, open_loop)]
                      if open_loop and cell is not open_loop and windows[wikitext] else None)
            refined = [d["refinement"] for d in cell["report"]["diagnostics"].values() if "refinement" in d]
            blocks = {(r["error_before"], r["error_after"], r["kept"]) for r in refined}  # one report per block
            kept = f"{sum(k for _, _, k in blocks)} / {len(blocks)}" if blocks else MISSING
            body.append([" + ".join(filter(None, [mode, refinement(cell)])), *shown,
                         f"{shared[0] - shared[1]:+.2f}" if shared else MISSING, kept,
                         fmt(cell["report"]["timings"].get("factorize"), ".0f"), fmt(cell.get("compress_seconds"), ".0f")])
        headers = [f"{PPL_COLUMNS[p]}, {max(windows[p])} windows" if windows[p] else PPL_COLUMNS[p]
                   for p in PPL_COLUMNS]
        factor_format, whitening, keep, dataset = cell_setting
        name = allocator + (f" `{variant}`" if variant else "")
        lines += [f"### Closed loop: {name}, {factor_format}, {whitening}, keep {keep:g}, {dataset} calibration",
                  "", *render(["closed loop", *headers, "Δ WikiText-2 vs open loop", "refined blocks kept",
                               "factorize s", "compress s"], body), ""]
    return lines


def most_shared_windows(rows: list[dict], dataset: str, split: str) -> int | None:
    """The window count on ``dataset``/``split`` that most rows were measured on (the larger on ties)."""
    counts = Counter(w for r in rows for w in perplexities(r, dataset, split))
    return max(counts, key=lambda w: (counts[w], w)) if counts else None


def allocator_tables(dense: dict | None, cells: list[dict]) -> list[str]:
    """Per keep ratio, format, whitening and calibration set with two or more allocators: each allocator's
    default (untagged) cell, best WikiText-2 perplexity first, every figure over the windows most of them share."""
    lines = []
    for cell_setting in sorted({setting(c) for c in cells}, key=lambda s: (s[3], s[1], -s[2], s[0])):
        group = [c for c in cells if not tag(c) and setting(c) == cell_setting]
        if len(group) < 2:
            continue
        windows = {p: most_shared_windows(group, *p) for p in PPL_COLUMNS}

        def ppl(row: dict, pair: tuple[str, str]) -> float | None:
            return perplexities(row, *pair).get(windows[pair])

        group.sort(key=lambda c: ppl(c, ("wikitext2", "test")) or math.inf)  # unmeasured last
        dense_summary = zeroshot_summary(dense) if dense else None  # one object: the dense row is not its own match
        body = []
        for row in ([dense] if dense else []) + group:
            name = "dense" if row is dense else row["report"]["config"]["allocator"]
            closed = None if row is dense or name == "uniform" else gap_closed(row, cells, dense)
            allocate = None if row is dense else row["report"]["timings"].get("allocate")
            body.append([name, *(fmt(ppl(row, p), ".2f") for p in PPL_COLUMNS), fmt(closed, ".0%"),
                         accuracy_text(dense_summary if row is dense else zeroshot_summary(row), [("dense", dense_summary)]),
                         fmt(allocate, ".1f"), *(speed_text(row, k) for k in ("prefill_speedup", "decode_speedup"))])
        headers = [f"{PPL_COLUMNS[p]}, {windows[p]} windows" if windows[p] else PPL_COLUMNS[p] for p in PPL_COLUMNS]
        factor_format, whitening, keep, dataset = cell_setting
        lines += [f"### Allocators at keep {keep:g}: {factor_format}, {whitening}, {dataset} calibration", "",
                  *render(["allocator", *headers, "gap closed", "zero-shot avg acc", "allocate s", "prefill ×dense",
                           "decode ×dense"], body), ""]
    return lines


def detail_table(rows: list[dict], columns: dict[str, Callable[[dict], str]]) -> list[str]:
    return render(["cell", *columns], [[row["cell"], *(f(row) for f in columns.values())] for row in rows])


def zeroshot_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if zeroshot_summary(r)]
    tasks = sorted({t for r in rows for t in r["zeroshot"]["tasks"]})
    def task_text(row: dict, task: str) -> str:
        metrics = row["zeroshot"]["tasks"].get(task, {})
        return accuracy_text((metrics["acc"], metrics.get("acc_stderr"))) if "acc" in metrics else MISSING

    columns: dict[str, Callable[[dict], str]] = {t: (lambda r, t=t: task_text(r, t)) for t in tasks}
    columns["avg acc"] = lambda r: accuracy_text(zeroshot_summary(r))
    columns["items per task"] = lambda r: "all" if r["zeroshot"]["limit"] is None else str(r["zeroshot"]["limit"])
    columns["source"] = lambda r: r["zeroshot"]["source"]
    return detail_table(rows, columns) if rows else []


def speed_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r.get("speed")]

    def ratio(key: str) -> Callable[[dict], str]:
        return lambda r: speed_text(r, key) if key in _RANGED else fmt(r.get("speed_ratio", {}).get(key), ".2f")

    def mib(key: str) -> Callable[[dict], str]:
        return lambda r: fmt(r["speed"][key] / 2**20 if r["speed"].get(key) is not None else None, ".1f")

    columns: dict[str, Callable[[dict], str]] = {
        "prefill tok/s": lambda r: f"{r['speed']['prefill_tokens_per_s']:.0f}",
        "decode tok/s": lambda r: f"{r['speed']['decode_tokens_per_s']:.1f}",
        "peak RSS MiB": mib("peak_rss_bytes"),
        "weights MiB": mib("weight_bytes"),
        "prefill ×": ratio("prefill_speedup"),
        "decode ×": ratio("decode_speedup"),
        "peak RSS ×": ratio("peak_rss_ratio"),
        "weights ×": ratio("weight_bytes_ratio"),
        "rounds": lambda r: str(r.get("speed_ratio", {}).get("rounds", 1)) if "speed_ratio" in r else MISSING,
        "threads": lambda r: str(r["speed"].get("threads", MISSING)),
        "load avg before": lambda r: fmt(r["speed"].get("load_average_1min"), ".2f"),
    }
    return detail_table(rows, columns) if rows else []


_RANGED = ("prefill_speedup", "decode_speedup")


def compression_table(cells: list[dict]) -> list[str]:
    columns: dict[str, Callable[[dict], str]] = {
        "target params": lambda c: f"{c['report']['measured']['target_params']:,}",
        "model params": lambda c: f"{c['report']['measured']['model_params']:,}",
        "peak GiB": lambda c: f"{c['report']['peak_memory_bytes'] / 2**30:.2f}",
        "held at start GiB": lambda c: fmt(_gib(c["report"].get("memory", {}).get("host_start_bytes")), ".2f"),
        "phases (s)": lambda c: ", ".join(f"{k} {v:.1f}" for k, v in c["report"]["timings"].items()),
    }
    return detail_table(cells, columns) if cells else []


def section(folder: Path, figures: Path) -> tuple[list[str], list[str]]:
    """Tables and plots of one results folder (one model), and its headline table alone."""
    dense, cells = load_cells(folder)
    cells.sort(key=sort_key)
    rows: list[dict[str, Any]] = ([dense] if dense else []) + cells
    model = rows[0]["model"] if rows else folder.name
    headline = headline_table(dense, cells)
    lines = [f"## {model}", "", *(["### Headline: dense and the best pipeline per keep ratio", "", *headline] if headline else []),
             *summary_table(dense, cells), "",
             *allocator_tables(dense, cells),
             *ablation_tables(cells), *closed_loop_tables(cells)]
    for title, table in (("Zero-shot accuracy per task", zeroshot_table(rows)),
                         ("Speed and memory", speed_table(rows)), ("Compression", compression_table(cells))):
        if table:
            lines += [f"### {title}", "", *table, ""]
    specs = sorted({s for r in rows for s in r.get("perplexity", {})})
    for spec in specs:
        points = [(f"{c['report']['config']['allocator']}/{c['report']['config']['factor_format']}/"
                   f"{c['report']['config']['whitening']}/{c['report']['config']['calibration']['dataset']}",
                   c["report"]["config"]["keep_ratio"], c["perplexity"][spec]["perplexity"])
                  for c in cells if spec in c.get("perplexity", {})]
        if points:
            name = f"pareto-{folder.name}-{spec.replace(':', '-')}.png"
            plot_pareto(points, figures / name, dense=dense["perplexity"][spec]["perplexity"] if dense and spec in dense.get("perplexity", {}) else None,
                        ylabel=f"perplexity {spec}")
            lines += [f"![perplexity against keep ratio, {spec}](figures/{name})", ""]
    plans = {c["cell"]: RankPlan.from_dict(c["report"]["plan"]) for c in cells
             if c["report"]["config"]["allocator"] != "uniform"}
    if plans:
        name = f"ranks-{folder.name}.png"
        plot_ranks(dict(list(plans.items())[:4]), figures / name)
        lines += [f"![ranks per layer and module type](figures/{name})", ""]
    return lines, headline


def readme_block(text: str, folder: Path, headline: list[str]) -> str:
    """``text`` with the lines between ``<!-- headline NAME -->`` and ``<!-- /headline NAME -->`` (NAME: the
    results folder's name) replaced by ``headline``, so the README shows the table RESULTS.md shows."""
    start, end = f"<!-- headline {folder.name} -->", f"<!-- /headline {folder.name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"the README has no '{start}' ... '{end}' block for {folder}")
    before, rest = text.split(start, 1)
    return "\n".join([before + start, "", *headline, end]) + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> None:
    global min_zeroshot_items
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, nargs="+", default=[Path("benchmarks/results/smollm2")],
                        help="results folders of compress_matrix.py, one per model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--title", default="SmolLM2-135M", help="page title; each results folder gets a section")
    parser.add_argument("--command", default="", help="the command that produced the cells, recorded in the page")
    parser.add_argument("--readme", type=Path, help="also write each folder's headline table into this file's "
                        "<!-- headline NAME --> ... <!-- /headline NAME --> block (NAME: the folder's name)")
    parser.add_argument("--min-zeroshot-items", type=int, default=DEFAULT_MIN_ZEROSHOT_ITEMS,
                        help="zero-shot figures over fewer items per task are not shown")
    args = parser.parse_args(argv)
    min_zeroshot_items = args.min_zeroshot_items
    lines = [f"# Results: {args.title}", "", "Produced by `benchmarks/compress_matrix.py`, tabulated by "
             "`benchmarks/make_results.py`; every figure is measured on the 2-core CPU machine. `compress s` includes "
             "calibration only for the first cell of a calibration set: later cells reuse its spectra (`--spectra-cache`). "
             "Cells timed while other jobs shared the CPU are slower than the machine can do: § marks a `compress s` "
             f"during which other processes used {SHARED_CPU_CORES} cores or more on average (measured for cells "
             "compressed since 2026-12-06).", ""]
    if args.command:
        lines += ["```bash", args.command, "```", ""]
    figures = args.out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    readme = args.readme.read_text() if args.readme else ""
    for folder in args.results:
        tables, headline = section(folder, figures)
        lines += tables
        if args.readme:
            readme = readme_block(readme, folder, headline)
    args.out.write_text("\n".join(lines))
    if args.readme:
        args.readme.write_text(readme)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
