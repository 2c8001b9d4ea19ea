"""Compress a model under a grid of settings and evaluate every cell with the same harness.

Each cell (allocator x factor format x whitening x keep ratio x calibration set) writes one JSON file
to the results folder; `make_results.py` turns the folder into RESULTS.md tables and plots. Every
cell, and the dense row (`--dense`, written to dense.json), can hold:

- perplexity on each `--eval` spec (`dataset:split[:max_windows]`);
- zero-shot accuracy (`--zeroshot`) on `--zeroshot-tasks` through lm-evaluation-harness, with the first
  `--zeroshot-limit` items per task (recorded as `limit` in the JSON; on a 2-core CPU the full sets
  take hours per model), with lm-eval's standard errors and that of the average; each task is stored
  as soon as it is done, so an interrupted run resumes at the next task;
- speed and memory (`--speed`): prefill tokens/s (512-token prompt), decode tokens/s (batch 1), peak
  RSS and weight bytes, and the compressed/dense ratios from `--speed-rounds` interleaved rounds (the
  dense model and the cell's, alternating which goes first), reported as the median ratio with its
  range over the rounds (`rankcut.evaluation.speed.paired_ratios`). Every model, dense or
  compressed, is measured in a fresh Python process loading it from disk, so that what this process
  ran before (calibration, lm-eval) does not weigh on its timings or its peak RSS. Timings are only
  comparable when both sides were measured on an idle machine: each measurement records the 1-minute
  load average seen just before it.

Runs resume: a cell whose JSON holds every requested evaluation is skipped; one that lacks some (say,
perplexity done but zero-shot not) gets only the missing ones, which needs the compressed model: it
is loaded from its artifact under `--artifacts DIR`; when that artifact is gone, the cell is compressed
again and used only if it reproduces the stored rank plan (otherwise it is skipped with a message saying
so, as it is without `--artifacts`). With `--artifacts` the cell JSON is also written after each evaluation,
so an interrupted cell resumes without compressing again; without it, a cell's JSON is written once
all its evaluations are done. Zero-shot tasks stored under another limit are all evaluated again.

Example (the SmolLM2 rows of benchmarks/RESULTS.md):
    RANKCUT_DATA=../shared/data python benchmarks/compress_matrix.py --model smollm2-135m \
        --allocators uniform energy --keeps 0.8 0.6 --formats plain pivga --calib wikitext2:validation \
        --eval wikitext2:test c4:validation:256 --dense --zeroshot --zeroshot-limit 200 --speed \
        --artifacts ARTIFACTS_DIR --spectra-cache SPECTRA_DIR
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import rankcut
from rankcut.data import load_text
from rankcut.evaluation.speed import compare_speed, cpu_of_others, paired_ratios, processor_name
from rankcut.evaluation.zeroshot import DEFAULT_TASKS, evaluate_zeroshot, task_average
from rankcut.compress import CLOSED_LOOPS
from rankcut.workdir import write_atomically

# Run by `isolated_speed` in a fresh interpreter: argv = model source, output JSON path.
SPEED_PROBE = """
import json, os, sys
import torch
import rankcut
from rankcut.evaluation.speed import measure_speed
load_average = os.getloadavg()[0]
model, tokenizer = rankcut.load_model(sys.argv[1])
result = measure_speed(model, tokenizer)
result.update(torch=torch.__version__, load_average_1min=load_average)
with open(sys.argv[2], "w") as file:
    json.dump(result, file)
"""
Loader = Callable[[], tuple[Any, Any]]


@dataclass(frozen=True)
class Evaluations:
    """The evaluations a row should hold, or (from `missing`) those it still lacks."""

    perplexity: tuple[str, ...] = ()
    zeroshot: tuple[str, ...] = ()
    zeroshot_limit: int | None = None
    speed: bool = False
    speed_rounds: int = 5

    def __bool__(self) -> bool:
        return bool(self.perplexity or self.zeroshot or self.speed)

    def __str__(self) -> str:
        parts = [f"perplexity {' '.join(self.perplexity)}"] if self.perplexity else []
        if self.zeroshot:
            parts.append(f"zero-shot {' '.join(self.zeroshot)} (limit {self.zeroshot_limit})")
        return ", ".join(parts + ["speed"] * self.speed)


def missing(row: dict, wanted: Evaluations) -> Evaluations:
    """The part of ``wanted`` that ``row`` does not hold yet: zero-shot tasks are counted one by one, at
    the wanted item limit (all of them again under another limit)."""
    zeroshot = row.get("zeroshot")
    done = set(zeroshot["tasks"]) if zeroshot is not None and zeroshot["limit"] == wanted.zeroshot_limit else set()
    return Evaluations(
        perplexity=tuple(spec for spec in wanted.perplexity if spec not in row.get("perplexity", {})),
        zeroshot=tuple(task for task in wanted.zeroshot if task not in done),
        zeroshot_limit=wanted.zeroshot_limit,
        speed=wanted.speed and ("speed" not in row if row.get("cell") == "dense"
                                else len(row.get("speed_rounds", [])) < wanted.speed_rounds),
        speed_rounds=wanted.speed_rounds,
    )


def write_json(path: Path, data: dict) -> None:
    """Atomically: a cell is rewritten after every evaluation, and an interrupted run must not leave it half written."""
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2, default=str)),
                     what="results cell")


def read_row(path: Path, model: str, new: dict) -> dict:
    """The row stored at ``path``, or ``new``; a row of another model means the wrong results folder."""
    if not path.exists():
        return new
    row = json.loads(path.read_text())
    if row.get("model") != model:
        raise SystemExit(f"{path} holds results for model {row.get('model')!r}, not {model!r}: use another --results")
    return row


def perplexity(model, tokenizer, spec: str, seqlen: int) -> dict:
    """Perplexity on ``name:split[:max_windows]``."""
    name, split, *windows = spec.split(":")
    result = rankcut.evaluate_perplexity(model, tokenizer, load_text(name, split), seqlen=seqlen,
                                         max_windows=int(windows[0]) if windows else None)
    print(f"    {spec}: ppl {result.perplexity:.3f} over {result.windows} windows ({result.seconds:.0f} s)", flush=True)
    return result.to_dict()


def isolated_speed(source: str | Path) -> dict:
    """`measure_speed` of the model at ``source`` (a model name or folder) in a fresh Python process."""
    with tempfile.TemporaryDirectory(prefix="rankcut-speed-") as tmp:
        out = Path(tmp) / "speed.json"
        subprocess.run([sys.executable, "-c", SPEED_PROBE, str(source), str(out)], check=True)
        result = json.loads(out.read_text())
    print(f"    speed: prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode {result['decode_tokens_per_s']:.1f} "
          f"tok/s, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, {result['threads']} threads, "
          f"load average {result['load_average_1min']:.2f} before", flush=True)
    return result


def add_evaluations(row: dict, todo: Evaluations, load: Loader, source: str | Path | None, args: argparse.Namespace,
                    checkpoint: Callable[[], None]) -> None:
    """Run the evaluations in ``todo`` into ``row``, calling ``checkpoint`` after each.

    ``load`` gives ``(model, tokenizer)`` and is called only when perplexity or zero-shot needs the
    model in this process; ``source`` is where the speed probe loads the model from.
    """
    for spec in todo.perplexity:
        model, tokenizer = load()
        row.setdefault("perplexity", {})[spec] = perplexity(model, tokenizer, spec, args.eval_seqlen)
        checkpoint()
    for task in todo.zeroshot:  # one task at a time, each kept as it is done: a long run resumes by task
        model, tokenizer = load()
        start = time.perf_counter()
        result = evaluate_zeroshot(model, tokenizer, [task], limit=todo.zeroshot_limit)
        stored = row.get("zeroshot")
        if stored is None or stored["limit"] != todo.zeroshot_limit:
            stored = row["zeroshot"] = {**result, "tasks": {}, "seconds": {}}
        stored["tasks"][task] = result["tasks"][task]
        stored.setdefault("seconds", {})[task] = time.perf_counter() - start
        stored["average_acc"], stored["average_acc_stderr"] = task_average(stored["tasks"])
        metrics = result["tasks"][task]
        print(f"    zero-shot {task}: acc {metrics['acc']:.4f} ± {metrics.get('acc_stderr', math.nan):.4f} over "
              f"{metrics['n']} items ({stored['seconds'][task]:.0f} s)", flush=True)
        checkpoint()
    if todo.speed and row["cell"] == "dense":
        row["speed"] = isolated_speed(source)
        checkpoint()
    elif todo.speed:
        rounds = []
        for index in range(todo.speed_rounds):  # interleaved, alternating which model goes first
            sides = ("dense", "compressed") if index % 2 == 0 else ("compressed", "dense")
            rounds.append({side: isolated_speed(args.model if side == "dense" else source) for side in sides})
        dense_runs, compressed_runs = [r["dense"] for r in rounds], [r["compressed"] for r in rounds]

        def median_run(runs: list[dict]) -> dict:
            return sorted(runs, key=lambda run: run["prefill_tokens_per_s"])[len(runs) // 2]

        row["speed_rounds"] = rounds
        row["speed"], row["speed_dense"] = median_run(compressed_runs), median_run(dense_runs)
        row["speed_ratio"] = {**compare_speed(row["speed_dense"], row["speed"]),
                              **paired_ratios(dense_runs, compressed_runs)}
        ratio = row["speed_ratio"]
        print("    compressed/dense over {rounds} rounds: prefill x{prefill_speedup:.2f}, decode x{decode_speedup:.2f}"
              .format(**ratio) + f" (ranges {ratio['prefill_speedup_range']}, {ratio['decode_speedup_range']})",
              flush=True)
        checkpoint()


def dense_row(args: argparse.Namespace, wanted: Evaluations, environment: dict) -> None:
    path = args.results / "dense.json"
    row = read_row(path, args.model, {"cell": "dense", "model": args.model, "environment": environment,
                                      "perplexity": {}})
    todo = missing(row, wanted)
    if not todo:
        print(f"skip dense ({path} holds every requested evaluation)")
        return
    print(f"dense: {todo}", flush=True)
    load = functools.cache(lambda: rankcut.load_model(args.model))
    add_evaluations(row, todo, load, args.model, args, lambda: write_json(path, row))


def resume_cell(cell: str, path: Path, config: rankcut.CompressionConfig, wanted: Evaluations,
                args: argparse.Namespace) -> None:
    """Add to an existing cell JSON the requested evaluations it lacks, from the cell's saved artifact.

    When the artifact is missing (never saved, or its folder was cleared) and an ``--artifacts`` folder
    is given, the cell is compressed again and kept only if it reproduces the stored rank plan: the
    figures already in the JSON then describe the same model, so they stay and only what is missing runs.
    """
    row = read_row(path, args.model, {})
    todo = missing(row, wanted)
    if not todo:
        print(f"skip {cell} ({path} holds every requested evaluation)")
        return
    if args.artifacts is None:
        print(f"skip {cell}: it lacks {todo}, which needs the compressed model, and no --artifacts folder was "
              f"given; pass the folder it was saved to, or delete {path} to compress it again", flush=True)
        return
    artifact = args.artifacts / cell
    if (artifact / "config.json").is_file():
        print(f"{cell}: adding {todo} to {path}, loading {artifact}", flush=True)
        load = functools.cache(lambda: rankcut.load(artifact))
    else:
        print(f"{cell}: adding {todo} to {path}; there is no artifact at {artifact}, compressing again", flush=True)
        model, tokenizer, report, _ = compress_cell(cell, config, args)
        if report.plan.ranks != row["report"]["plan"]["ranks"]:
            # a fresh cell must not resume this run's work folder: its time and peak would count only the rest
            shutil.rmtree(args.artifacts / f"{cell}.work", ignore_errors=True)
            print(f"skip {cell}: compressing again gave another rank plan than the one in {path}, so its stored "
                  f"figures would not describe the new model; delete {path} to start the cell afresh", flush=True)
            return
        save_cell(model, tokenizer, report, cell, args)
        load = functools.cache(lambda: (model, tokenizer))
    add_evaluations(row, todo, load, artifact, args, lambda: write_json(path, row))


def compress_cell(cell: str, config: rankcut.CompressionConfig,
                  args: argparse.Namespace) -> tuple[Any, Any, rankcut.CompressionReport, dict[str, float]]:
    """Load the base model and compress it for ``cell``; returns (model, tokenizer, report, timing): the
    timing's ``seconds`` and ``others_cpu_cores`` (what other processes used meanwhile, ~0 alone). With
    ``--artifacts`` the compression checkpoints into ``ARTIFACTS/CELL.work`` (removed by
    :func:`save_cell`), so a run killed mid-cell resumes there; ``seconds`` then counts this run's part."""
    model, tokenizer = rankcut.load_model(args.model)
    start = time.perf_counter()
    work_dir = args.artifacts / f"{cell}.work" if args.artifacts else None
    with cpu_of_others() as others:
        model, report = rankcut.compress(model, config, tokenizer=tokenizer, output_dir=args.results / f"{cell}-files",
                                         spectra_cache=args.spectra_cache, work_dir=work_dir)
    seconds = time.perf_counter() - start
    print(f"    compressed in {seconds:.0f} s, {report.measured['target_params']:,} target params", flush=True)
    return model, tokenizer, report, {"seconds": seconds, "others_cpu_cores": others.get("cores")}


def save_cell(model, tokenizer, report: rankcut.CompressionReport, cell: str, args: argparse.Namespace) -> Path:
    """Save the cell's artifact under ``--artifacts`` (overwriting what an interrupted save left, which has
    no config.json) and remove its compression work folder."""
    artifact = rankcut.save(model, tokenizer, args.artifacts / cell, report, base_model=args.model, overwrite=True)
    shutil.rmtree(args.artifacts / f"{cell}.work", ignore_errors=True)
    return artifact


def new_cell(cell: str, path: Path, config: rankcut.CompressionConfig, wanted: Evaluations, args: argparse.Namespace,
             environment: dict) -> None:
    print(cell, flush=True)
    model, tokenizer, report, timing = compress_cell(cell, config, args)
    row = {"cell": cell, "model": args.model, "environment": environment, "compress_seconds": timing["seconds"],
           "compress_others_cpu_cores": timing["others_cpu_cores"],
           "report": report.to_dict(), "perplexity": {}}
    with ExitStack() as stack:
        checkpoint, artifact = (lambda: None), None
        if args.artifacts:  # resumable from here on: later runs add evaluations from the artifact
            artifact = save_cell(model, tokenizer, report, cell, args)
            checkpoint = lambda: write_json(path, row)
            checkpoint()
        elif wanted.speed:  # the speed probe loads the model in a fresh process
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rankcut-cell-")))
            artifact = rankcut.save(model, tokenizer, folder / cell, report, base_model=args.model)
        add_evaluations(row, wanted, lambda: (model, tokenizer), artifact, args, checkpoint)
    write_json(path, row)


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--zeroshot", action="store_true", help="zero-shot accuracy on --zeroshot-tasks")
    parser.add_argument("--zeroshot-tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--zeroshot-limit", type=int, help="first N items per task (default: all)")
    parser.add_argument("--speed", action="store_true",
                        help="prefill/decode tokens/s and memory, against the dense model")
    parser.add_argument("--speed-rounds", type=int, default=5,
                        help="interleaved dense/compressed measurements per cell, for the ratios' median and range")
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/smollm2"))
    parser.add_argument("--artifacts", type=Path, help="save each compressed model here (and resume from it)")
    parser.add_argument("--closed-loops", nargs="+", default=["none"], choices=list(CLOSED_LOOPS),
                        help="closed-loop factorizations; a cell other than 'none' is named with a -MODE suffix")
    parser.add_argument("--compensations", nargs="+", type=float, default=[1.0],
                        help="shares of the upstream error compensated, for --closed-loops compensate (cells other "
                             "than 1 named -compensateX)")
    parser.add_argument("--anchors", nargs="+", type=float, default=[0.0],
                        help="weights of the dense fit within the compensating one, for --closed-loops compensate "
                             "(default 0, the unanchored fit, whose cells have no suffix; others named -anchorB)")
    parser.add_argument("--refine-steps", nargs="+", type=int, default=[0],
                        help="block refinement steps, for --closed-loops none, correct and compensate (cells named "
                             "-refineN)")
    parser.add_argument("--refine-lr", type=float, default=rankcut.CompressionConfig.refine_lr,
                        help="Adam's learning rate for the refinement (cells other than the default named -refineN-lrX)")
    parser.add_argument("--correction-rounds", nargs="+", type=int, default=[1],
                        help="weight-correction rounds, for --closed-loops correct (cells other than 1 named -correctN)")
    parser.add_argument("--correction-steps", nargs="+", type=float, default=[1.0],
                        help="shares of the correction's step, for --closed-loops correct (cells other than 1 named "
                             "-stepS)")
    parser.add_argument("--correction-windows", nargs="+", type=int,
                        default=[rankcut.CompressionConfig.correction_windows],
                        help="calibration windows of the correction's mean gradient, for --closed-loops correct (cells "
                             "other than the default named -windowsW)")
    parser.add_argument("--tag", default="", help="suffix for cell names (e.g. an ablation label)")
    parser.add_argument("--spectra-cache", type=Path, help="reuse spectra across cells with the same calibration")
    args = parser.parse_args(argv)
    if args.speed_rounds < 1:
        parser.error(f"--speed-rounds must be >= 1, got {args.speed_rounds}")
    args.results.mkdir(parents=True, exist_ok=True)
    allocator_options = json.loads(args.allocator_options)
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                   "cpu": processor_name(), "rankcut": rankcut.__version__}
    wanted = Evaluations(tuple(args.eval), tuple(args.zeroshot_tasks) if args.zeroshot else (), args.zeroshot_limit,
                         args.speed, args.speed_rounds)

    if args.dense:
        dense_row(args, wanted, environment)
        gc.collect()
    cells = itertools.product(args.calib, args.whitenings, args.allocators, args.formats, args.keeps,
                              args.closed_loops, args.compensations, args.anchors, args.refine_steps,
                              args.correction_rounds, args.correction_steps, args.correction_windows)
    default_windows, default_lr = rankcut.CompressionConfig.correction_windows, rankcut.CompressionConfig.refine_lr
    for (calib, whitening, allocator, factor_format, keep, closed_loop, compensation, anchor, refine_steps,
         rounds, step, windows) in cells:
        if (compensation != 1.0 or anchor) and closed_loop != "compensate":
            continue  # the blend and the anchor apply to the compensating fit only
        if refine_steps and closed_loop == "sequential":
            continue  # refinement follows the open-loop, the corrected or the compensating fit
        if (rounds != 1 or step != 1.0 or windows != default_windows) and closed_loop != "correct":
            continue
        dataset, split = calib.split(":")
        loop = "" if closed_loop == "none" else f"-{closed_loop}" + (f"{compensation:g}" if compensation != 1.0 else "")
        loop += f"{rounds}" if rounds != 1 else ""
        loop += f"-step{step:g}" if step != 1.0 else ""
        loop += f"-windows{windows}" if windows != default_windows else ""
        loop += f"-anchor{anchor:g}" if anchor else ""
        refine = f"-refine{refine_steps}" if refine_steps else ""
        refine += f"-lr{args.refine_lr:g}" if refine_steps and args.refine_lr != default_lr else ""
        cell = f"{allocator}-{factor_format}-{whitening}-keep{keep:g}-{dataset}{loop}{refine}{args.tag}"
        path = args.results / f"{cell}.json"
        config = rankcut.CompressionConfig(
            keep_ratio=keep, allocator=allocator, allocator_options=allocator_options.get(allocator, {}),
            whitening=whitening, factor_format=factor_format, closed_loop=closed_loop, compensation=compensation,
            anchor=anchor, refine_steps=refine_steps, refine_lr=args.refine_lr,
            **({"correction_rounds": rounds, "correction_step": step, "correction_windows": windows}
               if closed_loop == "correct" else {}),
            calibration=rankcut.CalibrationConfig(dataset=dataset, split=split,
                                                  nsamples=args.nsamples, seqlen=args.seqlen))
        if path.exists():
            resume_cell(cell, path, config, wanted, args)
        else:
            new_cell(cell, path, config, wanted, args, environment)
        gc.collect()  # the cell's model went out of scope with its function: free it before the next


if __name__ == "__main__":
    main()
