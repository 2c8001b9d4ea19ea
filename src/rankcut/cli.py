"""The ``rankcut`` command line: ``info``, ``ppl``, ``compress`` (and ``eval`` once present)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Annotated, Callable, Optional, ParamSpec

import typer
from rich.console import Console
from rich.table import Table

from .compress import CalibrationConfig, CompressionConfig
from .errors import RankcutError

P = ParamSpec("P")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Low-rank compression of Hugging Face causal LMs with global rank allocation.")
console = Console(stderr=True)
out = Console()

ModelOption = Annotated[str, typer.Option("--model", "-m", help="bundled name (smollm2-135m, gemma3-270m), HF folder, .gguf file, hub id, or rankcut artifact")]
DataDirOption = Annotated[Optional[Path], typer.Option("--data-dir", help="local data folder (default: $RANKCUT_DATA)")]
# ``compress``'s defaults are the configs' own, so the command and ``CompressionConfig()`` cannot drift apart.
COMPRESSION = {f.name: f.default for f in dataclasses.fields(CompressionConfig) if f.default is not dataclasses.MISSING}
CALIBRATION = {f.name: f.default for f in dataclasses.fields(CalibrationConfig)}


def _friendly_errors(command: Callable[P, None]) -> Callable[P, None]:
    """Print a :class:`RankcutError`'s message (no traceback) and exit with status 2."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except RankcutError as error:
            console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RankcutError(f"options are KEY=VALUE, got {pair!r}")
        options[key.replace("-", "_")] = value
    return options


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command()
@_friendly_errors
def info(model: ModelOption = "smollm2-135m") -> None:
    """Architecture, target linear modules with shapes, parameter counts (from the config and the
    checkpoint's headers: no weight is read)."""
    from .checkpoint import CheckpointSource
    from .models import checkpoint_folder
    from .targets import find_decoder_blocks, find_targets

    loaded = CheckpointSource.open(checkpoint_folder(model)).skeleton()
    prefix, blocks = find_decoder_blocks(loaded)
    targets = find_targets(loaded)
    total = sum(p.numel() for p in loaded.parameters())
    target_params = sum(t.out_features * t.in_features for t in targets)
    out.print(_table(f"{model}", [
        ("architecture", type(loaded).__name__),
        ("decoder blocks", f"{len(blocks)} at {prefix}"),
        ("parameters (unique)", f"{total:,}"),
        ("target modules", f"{len(targets)}"),
        ("target parameters", f"{target_params:,} ({target_params / total:.1%} of the model)"),
    ]))
    shapes = Table("module (block 0)", "out x in", "bias", title="target modules per block")
    for target in targets:
        if target.block == 0:
            shapes.add_row(target.name, f"{target.out_features} x {target.in_features}", str(target.bias))
    out.print(shapes)


@app.command()
@_friendly_errors
def ppl(
    model: ModelOption = "smollm2-135m",
    dataset: Annotated[str, typer.Option(help="wikitext2, ptb, c4, or a .txt/.jsonl/.parquet path")] = "wikitext2",
    split: Annotated[str, typer.Option(help="test, validation, ...")] = "test",
    seqlen: int = 512,
    batch_size: int = 4,
    max_windows: Annotated[Optional[int], typer.Option(help="evaluate only the first N windows (quick look)")] = None,
    data_dir: DataDirOption = None,
    device: str = "auto",
    dtype: str = "float32",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the result as JSON")] = None,
) -> None:
    """Perplexity (GPTQ / SVD-LLM protocol) of a model or a compressed artifact."""
    from .data import load_text
    from .evaluation.perplexity import evaluate_perplexity

    loaded, tokenizer = _load_any(model, dtype, device)
    corpus = load_text(dataset, split, data_dir=data_dir)
    result = evaluate_perplexity(loaded, tokenizer, corpus, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows)
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.to_dict().items()]
    out.print(_table(f"perplexity of {model}", rows))
    if result.nonfinite_windows:
        console.print(f"[yellow]warning: {result.nonfinite_windows} window(s) had a non-finite loss (included)")
    if json_out:
        json_out.write_text(json.dumps({"model": model, **result.to_dict()}, indent=2))


def _base_model_of(model) -> str | None:
    """The dense model an artifact was compressed from, as recorded in its settings."""
    from .artifacts import RankcutConfig

    config = getattr(model.config, "quantization_config", None)
    return config.settings.get("base_model") if isinstance(config, RankcutConfig) else None


def _load_any(spec: str, dtype: str, device: str):
    """An artifact (never with remote code) or any model ``load_model`` takes."""
    from .artifacts import MANIFEST, load
    from .models import load_model

    if (Path(spec) / MANIFEST).is_file():
        return load(spec, dtype=dtype, device=device)
    return load_model(spec, dtype=dtype, device=device)


@app.command()
@_friendly_errors
def compress(
    model: ModelOption = "smollm2-135m",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="artifact folder to write")] = Path("rankcut-out"),
    keep: Annotated[float, typer.Option("--keep", help="keep ratio of the target modules' parameters, in (0, 1]")] = COMPRESSION["keep_ratio"],
    allocator: Annotated[str, typer.Option(help="rank allocator (see `rankcut allocators`)")] = COMPRESSION["allocator"],
    allocator_option: Annotated[list[str], typer.Option("--allocator-option", "-a", help="KEY=VALUE, repeatable")] = [],
    whitening: Annotated[str, typer.Option(help="none | scale | cholesky")] = COMPRESSION["whitening"],
    whitening_option: Annotated[list[str], typer.Option("--whitening-option", "-w", help="KEY=VALUE, repeatable")] = [],
    factor_format: Annotated[str, typer.Option("--format", help="pivga (gauge-fixed, more rank per budget) | plain")] = COMPRESSION["factor_format"],
    calib: Annotated[str, typer.Option(help="calibration dataset name or file")] = CALIBRATION["dataset"],
    calib_split: str = CALIBRATION["split"],
    nsamples: int = CALIBRATION["nsamples"],
    seqlen: int = CALIBRATION["seqlen"],
    batch_size: int = CALIBRATION["batch_size"],
    seed: int = CALIBRATION["seed"],
    closed_loop: Annotated[Optional[str], typer.Option(
        help="none | sequential (refit each block to the compressed upstream's inputs) | compensate (fit each "
             "module's compressed-path output to the dense model's) | correct (ZS-SVD's correction: pull each "
             "truncated weight back towards the dense one along the loss gradient, decompose it again) "
             "[default: correct; none with --whitening none]")] = None,
    compensation: Annotated[float, typer.Option(
        help="with --closed-loop compensate: the share of the upstream error each module compensates, in [0, 1] "
             "(1: fit the dense outputs; 0: the module's own weight on the compressed inputs)")] = COMPRESSION["compensation"],
    anchor: Annotated[Optional[float], typer.Option(
        help="with --closed-loop compensate: weight (>= 0) of the dense fit on the dense inputs beside the "
             "compensating one; keeps each weight where the compressed inputs lost a direction instead of "
             "amplifying what is left of it [default: 1 with compensate]")] = None,
    refine_steps: Annotated[int, typer.Option(
        help="Adam steps per block on its factors, once fitted, towards the dense block's outputs on the "
             "compressed model's inputs, one calibration batch (--batch-size windows) per step (with --closed-loop "
             "none, correct or compensate)")] = COMPRESSION["refine_steps"],
    refine_lr: float = COMPRESSION["refine_lr"],
    correction_rounds: Annotated[int, typer.Option(
        help="with --closed-loop correct: rounds of a gradient sweep of the truncated model and a decomposition "
             "of the corrected weights")] = COMPRESSION["correction_rounds"],
    correction_windows: Annotated[int, typer.Option(
        help="with --closed-loop correct: calibration windows the mean gradient is taken over")] = COMPRESSION["correction_windows"],
    correction_step: Annotated[float, typer.Option(
        help="with --closed-loop correct: share of ZS-SVD's step each round takes, in (0, 1]")] = COMPRESSION["correction_step"],
    exclude: Annotated[list[str], typer.Option(help="module name patterns to keep dense, repeatable")] = [],
    data_dir: DataDirOption = None,
    device: str = "auto",
    dtype: str = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace an existing artifact at --out")] = False,
    work_dir: Annotated[Optional[Path], typer.Option(
        "--work-dir", help="checkpoint folder; rerun the same command to resume (default: <out>.work)")] = None,
    keep_work: Annotated[bool, typer.Option(help="keep the work folder after a successful save")] = False,
    spectra_cache: Annotated[Optional[Path], typer.Option(
        help="folder of reusable spectra: later runs on the same model, calibration and whitening skip calibration")] = None,
    trust_remote_code: Annotated[bool, typer.Option(
        help="run code shipped with the model folder or hub repo (off: only transformers' own classes)")] = False,
    max_memory: Annotated[Optional[str], typer.Option(
        help="host memory the run may use, e.g. 12GiB or 500MB (default: what is available now)")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="print the predicted peak memory and disk of the run, then stop")] = False,
) -> None:
    """Compress a model and write an artifact that loads again (``rankcut.load`` or ``from_pretrained``).

    The model streams from its checkpoint one decoder block at a time, and the artifact is written block
    by block. Interrupted runs resume: rerun the same command and it continues from the checkpoints in
    the work folder. Under ``torchrun --nproc-per-node N -m rankcut compress ...`` the N processes share
    the work (calibration data parallel, decompositions sharded); rank 0 writes the artifact.
    """
    import shutil

    from ._settings import resolve_dtype
    from .artifacts import check_output_folder
    from .checkpoint import CheckpointSource
    from .compress import compress_checkpoint
    from .distributed import init_from_environment
    from .estimate import estimate_compression, parse_memory
    from .models import available_device, checkpoint_folder

    if not dry_run:
        check_output_folder(out_dir, overwrite)  # before any expensive work
    work = work_dir if work_dir is not None else out_dir.resolve().with_name(f"{out_dir.resolve().name}.work")
    if work.resolve() == out_dir.resolve():
        raise RankcutError("--work-dir must differ from --out")
    config = CompressionConfig(
        keep_ratio=keep, allocator=allocator, allocator_options=_parse_options(allocator_option),
        whitening=whitening, whitening_options=_parse_options(whitening_option), factor_format=factor_format,
        closed_loop=closed_loop, compensation=compensation, anchor=anchor, refine_steps=refine_steps, refine_lr=refine_lr,
        correction_rounds=correction_rounds, correction_windows=correction_windows,
        correction_step=correction_step, exclude=list(exclude),
        calibration=CalibrationConfig(calib, calib_split, nsamples, seqlen, seed, batch_size,
                                      str(data_dir) if data_dir else None),
    )
    target, torch_dtype = available_device(device), resolve_dtype(dtype)
    limit = parse_memory(max_memory) if max_memory is not None else None
    folder = checkpoint_folder(model)
    if dry_run:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: per process
        estimate = estimate_compression(CheckpointSource.open(folder).config, config, dtype=torch_dtype, device=target,
                                        world_size=world_size)
        out.print(_table(f"predicted for rankcut compress {model} ({config.allocator}, {target})", estimate.rows()))
        return
    ranks = init_from_environment(target)  # joins torchrun's process group, if launched by it
    if ranks.leader and ((work / "run.json").is_file() or any(work.glob("rank-*/run.json"))):
        console.print(f"resuming from the checkpoints in {work}", soft_wrap=True)
    try:
        report = compress_checkpoint(folder, config, out_dir, base_model=model, dtype=torch_dtype, device=target,
                                     overwrite=overwrite, work_dir=work, spectra_cache=spectra_cache,
                                     trust_remote_code=trust_remote_code, max_memory=limit)
    except KeyboardInterrupt:
        console.print(f"interrupted; rerun the same command to resume from the checkpoints in {work}", soft_wrap=True)
        raise typer.Exit(130) from None
    if not ranks.leader:
        return  # rank 0 reports and removes the work folders (every rank is done with its own)
    path = out_dir
    if keep_work:
        console.print(f"work folder kept: {work}", soft_wrap=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    out.print(_table(f"rankcut compress {model} -> {path}", report.summary_rows()))
    console.print(f"full report: {path / 'rankcut_report.md'} and {path / 'rankcut_report.json'}")


@app.command("eval")
@_friendly_errors
def evaluate(
    model: ModelOption = "smollm2-135m",
    ppl_datasets: Annotated[list[str], typer.Option("--ppl", help="wikitext2, ptb, c4 or a file; repeatable")] = [],
    zeroshot: Annotated[Optional[str], typer.Option(help="comma-separated tasks, or 'all'")] = None,
    limit: Annotated[Optional[int], typer.Option(help="zero-shot items per task (quick look)")] = None,
    speed: Annotated[bool, typer.Option(help="prefill/decode tokens/s, memory and bytes")] = False,
    baseline: Annotated[Optional[str], typer.Option(help="dense model to compare speed against (default: an artifact's base model)")] = None,
    seqlen: int = 512,
    max_windows: Optional[int] = None,
    data_dir: DataDirOption = None,
    device: str = "auto",
    dtype: str = "float32",
    out_path: Annotated[Path, typer.Option("--out", help="results path stem (dots kept): writes STEM.json and STEM.md")] = Path("rankcut-eval"),
) -> None:
    """Evaluate a model or an artifact: any mix of perplexity, zero-shot tasks and speed."""
    from .evaluation.suite import EvaluationPlan, results_markdown, run_evaluation, write_results
    from .evaluation.zeroshot import DEFAULT_TASKS

    tasks = list(DEFAULT_TASKS) if zeroshot == "all" else [t for t in (zeroshot or "").split(",") if t]
    if not (ppl_datasets or tasks or speed):
        raise RankcutError("nothing to evaluate: pass --ppl, --zeroshot and/or --speed")
    loaded, tokenizer = _load_any(model, dtype, device)
    dense = None
    if speed:
        base = baseline or _base_model_of(loaded)
        dense = _load_any(base, dtype, device) if base else None
    plan = EvaluationPlan(ppl_datasets, seqlen, max_windows, tasks, limit, speed, str(data_dir) if data_dir else None,
                          extra={"model": model})
    results = run_evaluation(loaded, tokenizer, plan, baseline=dense)
    json_path, md_path = write_results(results, out_path)
    out.print(results_markdown(results))
    console.print(f"results: {json_path} and {md_path}")


@app.command()
@_friendly_errors
def allocators() -> None:
    """List allocators and whiteners with their options."""
    import dataclasses

    from .allocation import ALLOCATORS
    from .whitening import WHITENERS

    for registry in (ALLOCATORS, WHITENERS):
        table = Table("name", "options (default)", title=registry.kind)
        for name in registry.names():
            fields = dataclasses.fields(registry.config_class(name))
            table.add_row(name, ", ".join(f"{f.name}={f.default}" for f in fields) or "-")
        out.print(table)


if __name__ == "__main__":
    app()
