"""Zero-shot accuracy through lm-evaluation-harness, on the hub's datasets or fully offline.

Online, the harness's standard tasks run unchanged. Offline, the configs in ``tasks/`` mirror them
(same prompts, preprocessing and metrics) and read the local copies of the data sets found under
``<data folder>/zeroshot`` (layout of ``shared/data``, see its README). The local files come in their
original release formats, so each is converted here to the schema of the hub data set the standard
task reads; the converted files and the configs are rendered into a temporary folder that
:func:`local_tasks` hands to lm-eval through ``TaskManager(include_path=...)``.

lm-eval is an optional extra (``pip install 'rankcut[eval]'``) and is imported only when used.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._settings import data_dirs
from ..errors import ConfigError, DataNotFoundError, RankcutError
from ..hub import OFFLINE_ENV, hub_reachable

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa", "boolq", "mathqa")
#: The metric averaged over tasks: low-rank compression papers report the mean of plain accuracy.
AVERAGED_METRIC = "acc"
SOURCES = ("auto", "local", "hub")

TASKS_DIR = Path(__file__).with_name("tasks")
#: Stands for the folder of converted data files in the shipped YAML configs.
DATA_PLACEHOLDER = "__TASK_DATA__"

Doc = dict[str, Any]


# ------------------------------------------------------------------ local data -> hub schemas


def _read_jsonl(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _first_existing(folder: Path, *names: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataNotFoundError(f"none of {', '.join(names)} found in {folder}")


def _arc(folder: Path, name: str) -> list[Doc]:
    """ARC release jsonl -> allenai/ai2_arc (question string, choices as {text, label} lists)."""
    docs = []
    for item in _read_jsonl(folder / f"{name}-Test.jsonl"):
        choices = item["question"]["choices"]
        docs.append({
            "id": item["id"],
            "question": item["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": item["answerKey"],
        })
    return docs


def _piqa(folder: Path) -> list[Doc]:
    """Official valid.jsonl + valid-labels.lst -> baber/piqa (goal, sol1, sol2, int label)."""
    items = _read_jsonl(folder / "valid.jsonl")
    labels = _read_lines(folder / "valid-labels.lst")
    if len(items) != len(labels):
        raise DataNotFoundError(f"{folder}: {len(items)} PIQA items but {len(labels)} labels")
    return [
        {"goal": item["goal"], "sol1": item["sol1"], "sol2": item["sol2"], "label": int(label)}
        for item, label in zip(items, labels)
    ]


def _split_hellaswag_context(context: str) -> tuple[str, str]:
    """Recover ``(ctx_a, ctx_b)`` from ``ctx = ctx_a + " " + ctx_b``.

    The harness capitalizes ``ctx_b`` (the unfinished last sentence of ActivityNet items, e.g. "he"),
    but the local file keeps only the joined ``ctx``. ``ctx_b`` is taken to be the text after the last
    ". " when it starts in lower case; otherwise it is empty, which leaves the text unchanged as for
    items whose ``ctx_b`` is empty or already capitalized.
    """
    head, sep, tail = context.rpartition(". ")
    if tail[:1].islower():
        return (head + "." if sep else ""), tail
    return context, ""


def _hellaswag(folder: Path) -> list[Doc]:
    """llama.cpp's 6-lines-per-item text (label: ctx, gold, 4 endings) -> Rowan/hellaswag fields.

    The file's text went through the harness's own bracket/space cleanup already, which is idempotent,
    so applying ``preprocess`` again in ``process_docs`` gives the harness's strings.
    """
    path = _first_existing(folder, "hellaswag_val_full.txt", "hellaswag_val_sample100.txt")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataNotFoundError(f"{path}: {len(lines)} lines, not a multiple of 6")
    docs = []
    for start in range(0, len(lines), 6):
        label, _, context = lines[start].partition(": ")
        ctx_a, ctx_b = _split_hellaswag_context(context)
        docs.append({
            "activity_label": label,
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": context,
            "endings": lines[start + 2 : start + 6],
            "label": lines[start + 1].strip(),
        })
    return docs


def _winogrande(folder: Path) -> list[Doc]:
    """Partial-evaluation records + official labels -> allenai/winogrande (sentence with "_", options).

    The text before the blank is taken as the common prefix of both contexts, cut back to a word
    boundary; the harness only ever uses ``prefix + option``, which reproduces the given contexts.
    """
    records_path = _first_existing(folder, "winogrande.jsonl", "winogrande_sample100.jsonl")
    labels_path = folder / ("dev-labels.lst" if records_path.name == "winogrande.jsonl" else "dev-labels_sample100.lst")
    records, labels = _read_jsonl(records_path), _read_lines(labels_path)
    if len(records) != len(labels):
        raise DataNotFoundError(f"{records_path}: {len(records)} items but {len(labels)} labels in {labels_path.name}")
    docs = []
    for record, label in zip(records, labels):
        first, second = record["context_options"]
        if int(label) - 1 != record["gold"]:
            raise DataNotFoundError(
                f"{records_path}: gold {record['gold']} disagrees with label {label} in {labels_path.name}"
            )
        common = os.path.commonprefix([first, second])
        prefix = common[: common.rfind(" ") + 1] if not common.endswith(" ") else common
        docs.append({
            "sentence": f"{prefix}_ {record['continuation']}",
            "option1": first[len(prefix) :],
            "option2": second[len(prefix) :],
            "answer": label,
        })
    return docs


def _openbookqa(folder: Path) -> list[Doc]:
    """Official Main/test.tsv -> allenai/openbookqa "main" (question_stem, choices, answerKey)."""
    with (folder / "test.tsv").open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    docs = []
    for row in rows:
        parts = re.split(r"\s*\(([A-D])\)\s*", " " + row["Choices"])
        docs.append({
            "id": row["ID"],
            "question_stem": row["Question Stem"],
            "choices": {"text": parts[2::2], "label": parts[1::2]},
            "answerKey": row["Answer Key"],
        })
    return docs


def _boolq(folder: Path) -> list[Doc]:
    """SuperGLUE val.jsonl (label stored as "true"/"false" in this copy) -> super_glue/boolq (0/1)."""
    return [
        {
            "question": item["question"],
            "passage": item["passage"],
            "idx": item["idx"],
            "label": int(str(item["label"]).lower() == "true"),
        }
        for item in _read_jsonl(folder / "val.jsonl")
    ]


_MATHQA_FIELDS = ("Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category")


def _mathqa(folder: Path) -> list[Doc]:
    """JSON array -> regisss/math_qa rows (the copy's extra ``processed_options`` is dropped)."""
    items = json.loads((folder / "test.json").read_text(encoding="utf-8"))
    return [{key: item[key] for key in _MATHQA_FIELDS} for item in items]


#: Offline task -> (subfolder of ``<data>/zeroshot``, converter to the standard task's schema).
LOCAL_TASKS: dict[str, tuple[str, Callable[[Path], list[Doc]]]] = {
    "arc_easy": ("arc_easy", lambda folder: _arc(folder, "ARC-Easy")),
    "arc_challenge": ("arc_challenge", lambda folder: _arc(folder, "ARC-Challenge")),
    "piqa": ("piqa", _piqa),
    "hellaswag": ("hellaswag", _hellaswag),
    "winogrande": ("winogrande", _winogrande),
    "openbookqa": ("openbookqa", _openbookqa),
    "boolq": ("boolq", _boolq),
    "mathqa": ("mathqa", _mathqa),
}
#: Full files of the sets that the data folder may hold only a 100-item sample of.
_FULL_FILES = {"hellaswag": "hellaswag_val_full.txt", "winogrande": "winogrande.jsonl"}


def resolve_zeroshot_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``zeroshot`` folder of the first data folder that has one: ``data_dir``, then ``RANKCUT_DATA``."""
    tried = []
    for folder in data_dirs(data_dir):
        if (folder / "zeroshot").is_dir():
            return folder / "zeroshot"
        tried.append(f"{folder / 'zeroshot'} (not a folder)")
    if not tried:
        tried.append("no data folder: pass data_dir= or set RANKCUT_DATA")
    places = "\n  - ".join(tried)
    raise DataNotFoundError(f"zero-shot data not found. Tried:\n  - {places}")


def load_local_docs(task: str, data_dir: str | os.PathLike | None = None) -> list[Doc]:
    """The local data of ``task`` converted to the fields its standard lm-eval config reads."""
    if task not in LOCAL_TASKS:
        raise ConfigError(f"no offline config for task {task!r}; offline tasks: {', '.join(LOCAL_TASKS)}")
    subfolder, convert = LOCAL_TASKS[task]
    folder = resolve_zeroshot_dir(data_dir) / subfolder
    if task in _FULL_FILES and not (folder / _FULL_FILES[task]).is_file():
        logger.warning("%s: only the 100-item sample is available locally; its accuracy is indicative only", task)
    try:
        return convert(folder)
    except (OSError, KeyError, ValueError) as error:
        raise DataNotFoundError(f"{task}: cannot read the local data in {folder}: {error!r}") from error


# ------------------------------------------------------------------ lm-eval plumbing


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as error:
        raise RankcutError(
            f"zero-shot evaluation needs lm-evaluation-harness: pip install 'rankcut[eval]' ({error})"
        ) from error
    return lm_eval


@contextmanager
def offline_hub() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` for the block so ``datasets`` never waits on the hub.

    Libraries read these when first imported, so enter this before lm-eval/``datasets`` are imported.
    """
    saved = {name: os.environ.get(name) for name in OFFLINE_ENV}
    os.environ.update({name: "1" for name in OFFLINE_ENV})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def local_tasks(data_dir: str | os.PathLike | None = None, tasks: Sequence[str] = DEFAULT_TASKS):
    """Yield an lm-eval ``TaskManager`` whose tasks (named like the standard ones) read the local data.

    The shipped configs and ``utils.py`` are copied to a temporary folder with ``__TASK_DATA__``
    pointing at the converted data of ``tasks`` (plus the ``datasets`` cache), removed on exit.
    """
    lm_eval = _import_lm_eval()
    docs = {task: load_local_docs(task, data_dir) for task in tasks}
    with tempfile.TemporaryDirectory(prefix="rankcut_tasks_") as tmp:
        folder = Path(tmp)
        # A JSON string body is a valid YAML double-quoted string body, whatever the path holds.
        quoted = json.dumps(folder.as_posix())[1:-1]
        for config in TASKS_DIR.glob("*.yaml"):
            text = config.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, quoted)
            (folder / config.name).write_text(text, encoding="utf-8")
        shutil.copyfile(TASKS_DIR / "utils.py", folder / "utils.py")
        for task, rows in docs.items():
            with (folder / f"{task}.jsonl").open("w", encoding="utf-8") as file:
                file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        yield lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False)


def _choose_source(source: str) -> str:
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {SOURCES}, got {source!r}")
    if source != "auto":
        return source
    return "hub" if hub_reachable() else "local"


def _task_metrics(results: dict, n_samples: dict) -> dict[str, float | int]:
    """``{"acc,none": x, "acc_stderr,none": s, ...}`` -> ``{"acc": x, "acc_stderr": s, ..., "n": count}``."""
    metrics: dict[str, float | int] = {}
    for key, value in results.items():
        name, _, filter_name = key.partition(",")
        if filter_name == "none" and isinstance(value, (int, float)):
            metrics[name] = float(value)
    metrics["n"] = int(n_samples["effective"])
    return metrics


def task_average(per_task: dict[str, dict[str, float | int]]) -> tuple[float | None, float | None]:
    """The unweighted mean of ``acc`` over the tasks and its standard error ``√(Σ sᵢ²) / T`` (each
    task's lm-eval standard error ``sᵢ``; the tasks' items are independent). None where no task has
    ``acc`` (the error: where one lacks its standard error)."""
    scored = [metrics for metrics in per_task.values() if AVERAGED_METRIC in metrics]
    if not scored:
        return None, None
    mean = math.fsum(m[AVERAGED_METRIC] for m in scored) / len(scored)
    errors = [m.get(f"{AVERAGED_METRIC}_stderr") for m in scored]
    if any(e is None or not math.isfinite(e) for e in errors):
        return mean, None
    return mean, math.sqrt(math.fsum(e * e for e in errors)) / len(scored)


def evaluate_zeroshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM on lm-eval multiple-choice tasks.

    ``source="auto"`` runs the standard tasks when the hub is reachable and the offline mirrors
    otherwise; ``"hub"``/``"local"`` force one. ``limit`` keeps the first ``limit`` items per task.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}},
    "average_acc", "average_acc_stderr", "averaged_metric": "acc", "source", "limit", "lm_eval_version"}``;
    ``acc_norm`` is absent for tasks the harness scores with ``acc`` only (WinoGrande, BoolQ).
    ``average_acc`` is the unweighted mean of ``acc`` over the tasks (papers average acc, not
    acc_norm), with its standard error (:func:`task_average`); hub tasks without ``acc`` are left out.
    """
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("no tasks given")
    chosen = _choose_source(source)
    if chosen == "local":
        with offline_hub(), local_tasks(data_dir, tasks) as task_manager:
            raw = _run(model, tokenizer, tasks, task_manager, limit, batch_size, seed)
    else:
        raw = _run(model, tokenizer, tasks, None, limit, batch_size, seed)

    per_task = {task: _task_metrics(raw["results"][task], raw["n-samples"][task]) for task in tasks}
    average, stderr = task_average(per_task)
    return {
        "tasks": per_task,
        "average_acc": average,
        "average_acc_stderr": stderr,
        "averaged_metric": AVERAGED_METRIC,
        "source": chosen,
        "limit": limit,
        "lm_eval_version": raw["lm_eval_version"],
    }


def _run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    task_manager: Any,
    limit: int | None,
    batch_size: int,
    seed: int,
) -> dict:
    """One ``simple_evaluate`` call on the wrapped model, with every seed set to ``seed``.

    HFLM switches the model to eval mode; its previous mode is restored afterwards.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = lm_eval.evaluator.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    raw["lm_eval_version"] = getattr(lm_eval, "__version__", "unknown")
    return raw
