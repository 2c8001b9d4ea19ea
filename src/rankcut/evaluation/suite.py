"""One evaluation run: any mix of perplexity, zero-shot tasks and speed, written as JSON and Markdown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data import load_text
from .perplexity import evaluate_perplexity

# The papers' C4 figure: the first 256 windows of the validation text (GPTQ protocol).
DEFAULT_MAX_WINDOWS = {"c4": 256}


@dataclass
class EvaluationPlan:
    perplexity: Sequence[str] = ("wikitext2",)  # dataset names or paths; split from PPL_SPLITS
    seqlen: int = 512
    max_windows: int | None = None  # None: all windows (c4: 256, see DEFAULT_MAX_WINDOWS)
    zeroshot: Sequence[str] = ()
    limit: int | None = None
    speed: bool = False
    data_dir: str | None = None
    batch_size: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


PPL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}


def run_evaluation(model, tokenizer, plan: EvaluationPlan, *, baseline=None, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model``; with ``baseline`` (a dense ``(model, tokenizer)``) speed is compared too."""
    results: dict[str, Any] = {"perplexity": {}, **plan.extra}
    for name in plan.perplexity:
        split = PPL_SPLITS.get(name, "test")
        if name == "ptb":
            split = _ptb_split(plan.data_dir)
        corpus = load_text(name, split, data_dir=plan.data_dir)
        max_windows = plan.max_windows if plan.max_windows is not None else DEFAULT_MAX_WINDOWS.get(name)
        results["perplexity"][name] = evaluate_perplexity(
            model, tokenizer, corpus, seqlen=plan.seqlen, batch_size=plan.batch_size, max_windows=max_windows,
            show_progress=show_progress).to_dict()
    if plan.zeroshot:
        from .zeroshot import evaluate_zeroshot

        results["zeroshot"] = evaluate_zeroshot(model, tokenizer, plan.zeroshot, limit=plan.limit,
                                                data_dir=plan.data_dir)
    if plan.speed:
        from .speed import compare_speed, measure_speed

        results["speed"] = measure_speed(model, tokenizer)
        if baseline is not None:
            results["speed_dense"] = measure_speed(*baseline)
            results["speed_ratio"] = compare_speed(results["speed_dense"], results["speed"])
    return results


def _ptb_split(data_dir: str | None) -> str:
    """PTB's test split when present, else validation (the shared data folder ships only the latter)."""
    from ..errors import DataNotFoundError

    try:
        load_text("ptb", "test", data_dir=data_dir)
        return "test"
    except DataNotFoundError:
        return "validation"


def _with_error(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def results_markdown(results: dict[str, Any]) -> str:
    lines = []
    if results.get("perplexity"):
        lines += ["| dataset | split | seqlen | windows | perplexity | non-finite windows |", "|---|---|---|---|---|---|"]
        for name, r in results["perplexity"].items():
            lines.append(f"| {name} | {r['split']} | {r['seqlen']} | {r['windows']} | {r['perplexity']:.3f} | {r['nonfinite_windows']} |")
        lines.append("")
    if results.get("zeroshot"):
        zs = results["zeroshot"]
        lines += ["| task | acc ± stderr | acc_norm | n |", "|---|---|---|---|"]
        for task, r in zs["tasks"].items():
            norm = r.get("acc_norm")
            lines.append(f"| {task} | {_with_error(r['acc'], r.get('acc_stderr'))} | "
                         f"{'' if norm is None else f'{norm:.4f}'} | {r['n']} |")
        lines += [f"| average ({zs['averaged_metric']}) | {_with_error(zs['average_acc'], zs.get('average_acc_stderr'))} "
                  "| | |", ""]
    if results.get("speed"):
        lines += ["| quantity | value |", "|---|---|"]
        for key, value in results["speed"].items():
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        for key, value in results.get("speed_ratio", {}).items():
            lines.append(f"| ratio compressed/dense: {key} | {'n/a' if value is None else f'{value:.3f}'} |")
        lines.append("")
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """Write ``STEM.json`` and ``STEM.md``. The stem keeps its dots (``smollm2-keep0.8`` is not cut to
    ``smollm2-keep0``, which would make artifacts named by keep ratio overwrite each other's results);
    a path given with ``.json`` or ``.md`` names the stem before it."""
    stem = path.with_suffix("") if path.suffix in (".json", ".md") else path
    json_path, md_path = stem.with_name(f"{stem.name}.json"), stem.with_name(f"{stem.name}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str))
    md_path.write_text(results_markdown(results))
    return json_path, md_path
