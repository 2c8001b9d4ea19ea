"""Memory and time of the streamed pipeline on synthetic checkpoints of the LLaMA architecture.

Each cell writes a synthetic checkpoint (random bf16 weights, shard by shard: never instantiated
whole, SmolLM2's tokenizer), then compresses it in a fresh process with random calibration token ids
and reads that process's peak RSS from the kernel (VmHWM), next to the estimator's prediction. Cells
already recorded are skipped, so the script resumes; ``--render`` writes RESULTS-scale.md from them.

    python benchmarks/scale.py depth            # hidden 1024: 4 / 16 / 32 blocks
    python benchmarks/scale.py width            # the LLaMA-2-7B shape: 2 / 8 blocks
    python benchmarks/scale.py gpu              # the 7B shape on CUDA in bf16 (benchmarks/gpu_check.sh)
    python benchmarks/scale.py distributed      # 2 processes of 1 thread (torchrun) against 1 of 2 threads
    python benchmarks/scale.py --render
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale"
PAGE = HERE / "RESULTS-scale.md"
GiB = 2**30

SHAPES = {
    "depth": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                  vocab_size=32000),
    "width": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32000),
}
PLANS = {  # suite -> (blocks, allocators (or allocator+closed loop), nsamples x seqlen, device, compute dtype)
    "depth": ([4, 16, 32], ["uniform", "energy", "zerosum", "strs", "ara", "fermigrad", "dobi", "zerosum+correct",
                            "uniform+compensate"], (32, 256), "cpu", "float32"),
    "width": ([2, 8], ["uniform", "zerosum"], (32, 512), "cpu", "float32"),
    "gpu": ([2, 4], ["uniform", "zerosum"], (32, 512), "cuda", "bfloat16"),  # benchmarks/gpu_check.sh
    "tiny": ([2], ["uniform", "uniform+compensate"], (4, 32), "cpu", "float32"),  # the script's own test
}
# The training allocators' memory is that of one step: a few steps measure it (not the quality of a plan).
ALLOCATOR_OPTIONS = {"ara": {"steps": 4}, "fermigrad": {"steps": 4}, "dobi": {"steps": 4}}
# The closed loops of a cell named allocator+loop (issue 19): the streaming memory bound must hold with them on.
# Refinement's memory is that of one step too.
CLOSED_LOOPS = {"": {"closed_loop": "none"}, "correct": {"closed_loop": "correct"},
                "compensate": {"closed_loop": "compensate", "refine_steps": 4}}
SHAPES["gpu"] = SHAPES["width"]
SHAPES["tiny"] = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=512)


def write_checkpoint(folder: Path, shape: dict, blocks: int, seed: int = 0) -> None:
    """A LLaMA checkpoint with random bf16 weights, one shard per block (plus one for the rest)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rankcut.checkpoint import stored_names
    from rankcut.errors import ModelNotFoundError
    from rankcut.models import checkpoint_folder

    config = LlamaConfig(**shape, num_hidden_layers=blocks, max_position_embeddings=4096, tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = stored_names(skeleton)
    groups = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(blocks)]
    groups.append([n for n in names if not n.startswith("model.layers.")])
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    for index, group in enumerate(groups):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            size = names[name]
            if len(size) == 1:  # norms
                tensors[name] = torch.ones(size, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(size, generator=generator) / size[-1] ** 0.5).to(torch.bfloat16)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    try:  # the calibration ids are random: the tokenizer only travels into the artifact
        tokenizer = checkpoint_folder("smollm2-135m")
    except ModelNotFoundError:  # e.g. on the GPU machine, which has no bundled model
        return
    for path in [*tokenizer.glob("tokenizer*"), *tokenizer.glob("special_tokens_map.json")]:
        shutil.copy(path, folder / path.name)


def cell_config(variant: str, nsamples: int, seqlen: int, options: dict | None = None):
    """The compression a cell runs: ``variant`` is an allocator, or allocator+closed loop (``zerosum+correct``);
    random calibration ids, keep 0.8, the allocator's options as recorded (by default ALLOCATOR_OPTIONS)."""
    from rankcut import CalibrationConfig, CompressionConfig

    allocator, _, loop = variant.partition("+")
    return CompressionConfig(keep_ratio=0.8, allocator=allocator,
                             allocator_options=ALLOCATOR_OPTIONS.get(allocator, {}) if options is None else options,
                             calibration=CalibrationConfig("random", "-", nsamples, seqlen, batch_size=8),
                             **CLOSED_LOOPS[loop])


def run_cell(folder: Path, variant: str, nsamples: int, seqlen: int, out: Path, device: str, dtype: str) -> dict:
    """Compress ``folder`` in this (fresh) process, one rank of several under torchrun, and return what
    was measured (the peak is this rank's)."""
    import torch

    from rankcut._settings import resolve_dtype

    from rankcut.compress import compress_checkpoint
    from rankcut.distributed import init_from_environment
    from rankcut.estimate import estimate_compression
    from rankcut.checkpoint import CheckpointSource

    ranks = init_from_environment(torch.device(device))

    config = cell_config(variant, nsamples, seqlen)
    torch_dtype = resolve_dtype(dtype)
    source = CheckpointSource.open(folder)
    estimate = estimate_compression(source.config, config, dtype=torch_dtype, device=device, world_size=ranks.world_size)
    ids = torch.randint(0, source.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    report = compress_checkpoint(folder, config, out, calibration=ids, show_progress=False, dtype=torch_dtype,
                                 device=device, work_dir=out.with_name(out.name + ".work"), max_memory=1 << 50)
    wall = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    return {"peak_rss_bytes": peak, "predicted_host_bytes": estimate.host_bytes, "predicted_stages": estimate.stages,
            "predicted_device_bytes": estimate.device_bytes, "device_peak_bytes": report.memory["cuda_peak_bytes"],
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
            "wall_seconds": wall, "timings": report.timings, "measured": report.measured,
            "closed_loop": report.config["closed_loop"], "refine_steps": report.config["refine_steps"],
            "rank": ranks.rank, "world_size": ranks.world_size, "plan": report.plan.ranks}


def measure(suite: str, threads: int, results: Path = RESULTS, only: list[str] | None = None,
            depths: list[int] | None = None) -> None:
    """The suite's cells not recorded yet (``only`` those allocators, ``depths`` those block counts)."""
    from rankcut.evaluation.speed import cpu_of_others, processor_name

    blocks_list, allocators, (nsamples, seqlen), device, dtype = PLANS[suite]
    results.mkdir(parents=True, exist_ok=True)
    for blocks in (b for b in blocks_list if depths is None or b in depths):
        pending = [a for a in allocators if not (results / f"{suite}-{blocks}-{a}.json").exists()
                   and (only is None or a in only)]
        if not pending:
            continue
        with tempfile.TemporaryDirectory(prefix="rankcut-scale-") as scratch:
            folder = Path(scratch) / "model"
            write_checkpoint(folder, SHAPES[suite], blocks)
            for allocator in pending:
                cell = results / f"{suite}-{blocks}-{allocator}.json"
                with cpu_of_others() as others:
                    measured = compress_in_fresh_processes(folder, allocator, nsamples, seqlen,
                                                           Path(scratch) / f"out-{allocator}", device, dtype, threads, 1,
                                                           cell.name)
                record = {"suite": suite, "blocks": blocks, "allocator": allocator, "shape": SHAPES[suite],
                          "allocator_options": ALLOCATOR_OPTIONS.get(allocator.partition("+")[0], {}),
                          "device_kind": device,
                          "nsamples": nsamples, "seqlen": seqlen, "threads": threads,
                          "machine": f"{platform.machine()}, {os.cpu_count()} cores", "cpu": processor_name(),
                          "others_cpu_cores": others.get("cores"), **measured[0]}
                cell.write_text(json.dumps(record, indent=2))
                print(f"{cell.name}: peak {record['peak_rss_bytes'] / GiB:.2f} GiB "
                      f"(predicted {record['predicted_host_bytes'] / GiB:.2f}), {record['wall_seconds']:.0f} s")


def compress_in_fresh_processes(folder: Path, allocator: str, nsamples: int, seqlen: int, out: Path, device: str,
                                dtype: str, threads: int, processes: int, name: str, launch: bool = False) -> list[dict]:
    """:func:`run_cell` in a fresh process, or in ``processes`` ranks launched as torchrun launches them
    (``threads`` each; ``launch``: through torchrun even for one); every rank's record, rank 0 first."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RANKCUT_CACHE": str(out.with_name(out.name + ".cache"))}
    cell = [__file__, "--cell", str(folder), allocator, str(nsamples), str(seqlen), str(out), device, dtype]
    launch = launch or processes > 1
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if launch else []
    result = subprocess.run([sys.executable, *launcher, *cell], env=env, capture_output=True, text=True)
    if result.returncode:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"cell {name} failed")
    return [json.loads(out.with_name(f"{out.name}.rank{rank}.json").read_text()) for rank in range(processes)]


DISTRIBUTED = {  # model -> (allocators, nsamples x seqlen): 1 process of 2 threads, then 2 ranks of 1 thread
    "depth-4": (["uniform", "zerosum"], (32, 256)),
    "smollm2-135m": (["uniform", "zerosum"], (256, 512)),
}


def measure_distributed(results: Path = RESULTS, only: list[str] | None = None) -> None:
    """Wall time by phase, peak per rank and plan of one compression in 1 process of 2 threads and in 2
    processes of 1 thread (torchrun, gloo), on the 1024-wide synthetic model (4 blocks) and SmolLM2."""
    from rankcut.evaluation.speed import cpu_of_others, processor_name
    from rankcut.models import checkpoint_folder

    results.mkdir(parents=True, exist_ok=True)
    for model, (allocators, (nsamples, seqlen)) in DISTRIBUTED.items():
        with tempfile.TemporaryDirectory(prefix="rankcut-distributed-") as scratch:
            if model == "smollm2-135m":
                folder = checkpoint_folder(model)
            else:
                folder = Path(scratch) / "model"
                write_checkpoint(folder, SHAPES["depth"], 4)
            for allocator in (a for a in allocators if only is None or a in only):
                for processes, threads in ((1, 2), (2, 1)):
                    cell = results / f"distributed-{model}-{allocator}-{processes}x{threads}.json"
                    if cell.exists():
                        continue
                    with cpu_of_others() as others:
                        ranks = compress_in_fresh_processes(folder, allocator, nsamples, seqlen,
                                                            Path(scratch) / f"out-{allocator}-{processes}", "cpu",
                                                            "float32", threads, processes, cell.name)
                    record = {"suite": "distributed", "model": model, "allocator": allocator, "processes": processes,
                              "threads": threads, "nsamples": nsamples, "seqlen": seqlen,
                              "others_cpu_cores": others.get("cores"),
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "cpu": processor_name(),
                              "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
                              "predicted_host_bytes": ranks[0]["predicted_host_bytes"],
                              "wall_seconds": ranks[0]["wall_seconds"], "timings": ranks[0]["timings"],
                              "plan": ranks[0]["plan"], "plans_agree": all(r["plan"] == ranks[0]["plan"] for r in ranks)}
                    cell.write_text(json.dumps(record, indent=2))
                    print(f"{cell.name}: {record['wall_seconds']:.0f} s, peaks "
                          f"{[f'{b / GiB:.2f}' for b in record['peak_rss_bytes_per_rank']]} GiB")


def real_model_table(records: list[dict]) -> list[str]:
    """``rankcut compress`` on the bundled models (streamed from the checkpoint folder, benchmarks/time_cli.py
    --cell) beside the RESULTS.md cell of the same settings, compressed with the whole model loaded."""
    if not records:
        return []
    lines = ["", "## Real models through the streamed path", "",
             "`rankcut compress` streams the bundled model from its checkpoint folder block by block; each run "
             "(fresh process, alone on the machine) beside the `compress_matrix.py` cell of the same settings, "
             "compressed through the Python API with the whole model loaded; perplexity over the first windows of the "
             "split. `peak`: the command's whole process (model load and save included); the cell's is its "
             "`compress` call with the model already loaded. `wall s`: the command, load to save; the cell's "
             "compress seconds, of which calibration (near 0 where it read cached spectra). `others' CPU`: the cores "
             "other processes used meanwhile (— where not measured). A command without `--closed-loop` was recorded "
             "when the open loop was the default: it ran open loop, as its cell did.", "",
             "| command | same plan as the cell | perplexity | ppl (cell) | peak GiB (cell) | wall s (cell: compress / calibration s) | others' CPU | cpu |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["command"]):
        ref = r["reference"]
        same = "yes" if ref["same_plan"] else f"no: {len(ref['modules_with_another_rank'])} modules differ"
        cpus = "same" if ref.get("cpu") == r["environment"].get("cpu") else f"{r['environment'].get('cpu')} (cell: {ref.get('cpu') or 'not recorded'})"
        ppl = r["perplexity"]
        lines.append(f"| `{r['command']}` | {same} | {ppl['dataset']} {ppl['split']}, {ppl['windows']} windows | "
                     f"{ppl['perplexity']:.4f} ({ref['perplexity']:.4f}) | "
                     f"{r['process_peak_rss_bytes'] / GiB:.2f} ({ref['peak_bytes'] / GiB:.2f}) | "
                     f"{r['wall_seconds']:.0f} ({ref['compress_seconds']:.0f} / {ref['calibrate_seconds']:.0f}) | "
                     f"{'—' if r.get('others_cpu_cores') is None else format(r['others_cpu_cores'], '.2f')} | {cpus} |")
    return lines


def host_labels(cells: list[dict]) -> dict[str, str]:
    """A short label (A, B, ...) for each processor the cells recorded, in the order first met."""
    cpus = dict.fromkeys(c["cpu"] for c in cells if c.get("cpu"))
    return {cpu: chr(ord("A") + i) for i, cpu in enumerate(cpus)}


def distributed_table(records: list[dict]) -> list[str]:
    """The distributed cells: each run beside the one-process run of the same model and allocator."""
    if not records:
        return []
    lines = ["", "## Several processes (torchrun, gloo) against one", "",
             "The same compression in 1 process of 2 threads and in 2 processes of 1 thread each "
             "(`torchrun --nproc-per-node 2`, gloo), on this 2-core machine: calibration batches dealt to the "
             "ranks, each input group's Grams summed and decomposed by one rank, the allocator data parallel. "
             "Random calibration ids, keep 0.8, PivGa, float32. The cells ran one after another with nothing "
             "else on the machine.", "",
             "| model | allocator | calibration | processes x threads | wall s | calibrate + decompose s | "
             "allocate s | factorize s | peak GiB per rank | same plan as 1 process |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    alone = {(r["model"], r["allocator"]): r for r in records if r["processes"] == 1}
    for r in sorted(records, key=lambda r: (r["model"], r["allocator"], r["processes"])):
        t = r["timings"]
        reference = alone.get((r["model"], r["allocator"]))
        same = "—" if reference is None or r is reference else ("yes" if r["plan"] == reference["plan"] and r["plans_agree"] else "no")
        lines.append(f"| {r['model']} | {r['allocator']} | {r['nsamples']} x {r['seqlen']} | {r['processes']} x {r['threads']} | "
                     f"{r['wall_seconds']:.0f} | {t.get('calibrate + decompose', 0.0):.0f} | {t.get('allocate', 0.0):.0f} | "
                     f"{t.get('factorize', 0.0):.0f} | {' / '.join(f'{b / GiB:.2f}' for b in r['peak_rss_bytes_per_rank'])} | "
                     f"{same} |")
    return lines


def check_launched(device: str) -> None:
    """One compression of a tiny synthetic LLaMA run alone and as a world of one under torchrun (NCCL on
    CUDA, gloo on CPU, every collective going through the backend): the same plan and artifact."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="rankcut-launched-") as scratch:
        folder = Path(scratch) / "model"
        write_checkpoint(folder, SHAPES["tiny"], 2)
        runs = {}
        for launch in (False, True):
            out = Path(scratch) / f"out-{launch}"
            runs[launch] = compress_in_fresh_processes(folder, "zerosum", 4, 32, out, device, "float32", 2, 1,
                                                       f"launched={launch}", launch=launch)[0]
            runs[launch]["tensors"] = {name: t for shard in sorted(out.glob("*.safetensors"))
                                       for name, t in load_file(shard).items()}
        alone, launched = runs[False], runs[True]
        if alone["plan"] != launched["plan"]:
            raise SystemExit(f"torchrun on {device}: the plan differs from one process's")
        if alone["tensors"].keys() != launched["tensors"].keys() or not all(
                (alone["tensors"][k] == launched["tensors"][k]).all() for k in alone["tensors"]):
            raise SystemExit(f"torchrun on {device}: the artifact differs from one process's")
        print(f"torchrun (world of one, {'NCCL' if device == 'cuda' else 'gloo'}) on {device}: same plan and "
              f"artifact as one process ({len(alone['tensors'])} tensors)")


def predict(cell: dict) -> tuple[int, int]:
    """The current estimator's host and device figures for a recorded cell (so the page always compares
    the measurements with the estimator as it is now)."""
    from transformers import LlamaConfig

    from rankcut._settings import resolve_dtype
    from rankcut.estimate import estimate_compression

    config = LlamaConfig(**cell["shape"], num_hidden_layers=cell["blocks"], max_position_embeddings=4096,
                         tie_word_embeddings=False)
    run = cell_config(cell["allocator"], cell["nsamples"], cell["seqlen"], cell.get("allocator_options", {}))
    estimate = estimate_compression(config, run, dtype=resolve_dtype(cell.get("dtype", "float32")),
                                    device=cell.get("device_kind", "cpu"))
    return estimate.host_bytes, estimate.device_bytes


def shared_cpu(cell: dict) -> str:
    """The cores other processes used during the cell (measured), or for cells recorded before that
    was measured, the load average before it (a hint only: it includes the script's own work)."""
    if cell.get("others_cpu_cores") is not None:
        return f"{cell['others_cpu_cores']:.2f}"
    return f"load {cell.get('load_before', 0):.1f} before"


def option_text(cell: dict) -> str:
    """The allocator options a cell ran with, as `` (steps=4)``; empty for the defaults."""
    options = cell.get("allocator_options") or {}
    return f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""


def render(results: Path = RESULTS, page: Path = PAGE) -> None:
    from rankcut.evaluation.speed import SHARED_CPU_CORES

    records = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    distributed = [c for c in records if c.get("suite") == "distributed"]
    commands = [c for c in records if "reference" in c]  # benchmarks/time_cli.py --cell runs of the real models
    records = [c for c in records if c.get("suite") != "distributed" and "reference" not in c]
    cells = [c for c in records if "allocation" not in c]
    before = [c for c in records if "allocation" in c]  # recorded when the allocator loaded the whole model
    for cell in cells:
        cell["predicted_host_bytes"], cell["predicted_device_bytes"] = predict(cell)
    lines = ["# Results: memory and time of the streamed pipeline at scale", "",
             "Made by `benchmarks/scale.py` on synthetic LLaMA checkpoints (random bf16 weights, compute in "
             "float32, keep 0.8, PivGa, random calibration ids), each cell compressed in a fresh process. "
             "`peak` is the process's VmHWM; `predicted` is `rankcut compress --dry-run`'s host figure, computed "
             "by the estimator as it is when the page is rendered.", "",
             "| suite | device, dtype | blocks | allocator | calibration | peak GiB | predicted GiB | "
             "predicted / peak | device peak GiB (predicted) | wall s | "
             "s per block (calibrate + decompose / allocate / factorize) | others' CPU | cpu |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hosts = host_labels(cells)
    for c in sorted(cells, key=lambda c: (c["suite"], c["allocator"], c["blocks"])):
        t = c["timings"]
        per_block = " / ".join(f"{t.get(k, 0.0) / c['blocks']:.1f}"
                               for k in ("calibrate + decompose", "allocate", "factorize"))
        device_peak = (f"{c['device_peak_bytes'] / GiB:.2f} ({c['predicted_device_bytes'] / GiB:.2f})"
                       if c.get("device_peak_bytes") else "—")
        lines.append(f"| {c['suite']} | {c.get('device', 'cpu')}, {c.get('dtype', 'float32')} | {c['blocks']} | "
                     f"{c['allocator']}{option_text(c)} | {c['nsamples']} x {c['seqlen']} | {c['peak_rss_bytes'] / GiB:.2f} | "
                     f"{c['predicted_host_bytes'] / GiB:.2f} | {c['predicted_host_bytes'] / c['peak_rss_bytes']:.2f} | "
                     f"{device_peak} | {c['wall_seconds']:.0f} | {per_block} | {shared_cpu(c)} | "
                     f"{hosts.get(c.get('cpu'), '?')} |")
    lines += ["", "`others' CPU`: the cores other processes used on average while the cell ran (the machine's busy "
              "time less the cell's own, from /proc/stat; 2 cores): near 0, the cell ran alone; from "
              f"{SHARED_CPU_CORES} its times are slower than the machine can do; peaks are unaffected. Cells recorded before this was "
              "measured show the 1-minute load average when they started instead, a hint only: it includes the "
              "script's own writing of the checkpoint just before.",
              "`cpu`: the processor the cell ran on, as the sessions' hosts differ (times compare only on one; "
              "`?`: not recorded)." + "".join(f" {label}: {cpu}." for cpu, label in hosts.items()),
              "", "## Depth: peak growth over the shallowest model of each allocator", "",
              "| suite | allocator | blocks | peak - shallowest peak, GiB |", "|---|---|---|---|"]
    for suite in sorted({c["suite"] for c in cells}):
        for allocator in sorted({c["allocator"] for c in cells if c["suite"] == suite}):
            mine = sorted((c for c in cells if c["suite"] == suite and c["allocator"] == allocator),
                          key=lambda c: c["blocks"])
            for c in mine[1:]:
                lines.append(f"| {suite} | {allocator} | {mine[0]['blocks']} -> {c['blocks']} | "
                             f"{(c['peak_rss_bytes'] - mine[0]['peak_rss_bytes']) / GiB:+.2f} |")
    if before:
        lines += ["", "## Before: zerosum and strs loaded the whole model to allocate", "",
                  "Recorded with the same settings before their allocation was streamed (commit b566707): the peak "
                  "grew with depth. zerosum then scored in one stage; the streamed cells of 4 and 16 blocks ran four (the default "
                  "when they were recorded; one gradient sweep each), the 32-block one one stage (today's default), so "
                  "only the 32-block allocation times compare.", "", "| suite | blocks | allocator | peak GiB | wall s | allocate s |",
                  "|---|---|---|---|---|---|"]
        for c in sorted(before, key=lambda c: (c["suite"], c["allocator"], c["blocks"])):
            lines.append(f"| {c['suite']} | {c['blocks']} | {c['allocator']} | {c['peak_rss_bytes'] / GiB:.2f} | "
                         f"{c['wall_seconds']:.0f} | {c['timings'].get('allocate', 0.0):.0f} |")
    lines += extrapolation(cells)
    lines += distributed_table(distributed)
    lines += real_model_table(commands)
    lines += ["", "## Predictions for real models", "",
              "The estimator's figures (`rankcut compress --dry-run`) at 256 x 512 calibration tokens, keep 0.8, the default "
              "closed loop (the correction): CPU "
              "in float32, one GPU in bfloat16 (host / device).", "",
              "| model | allocator | CPU host GiB | GPU host / device GiB | disk GiB |", "|---|---|---|---|---|"]
    for model, config in REAL_MODELS.items():
        for allocator in ("uniform", "energy", "strs", "zerosum", "ara", "fermigrad", "dobi"):
            cpu = estimate_real(config, allocator, "float32", "cpu")
            gpu = estimate_real(config, allocator, "bfloat16", "cuda")
            lines.append(f"| {model} | {allocator} | {cpu.host_bytes / GiB:.1f} | {gpu.host_bytes / GiB:.1f} / "
                         f"{gpu.device_bytes / GiB:.1f} | {cpu.disk_bytes / GiB:.0f} |")
    page.write_text("\n".join(lines) + "\n")
    print(page.read_text())


def extrapolation(cells: list[dict]) -> list[str]:
    """Each phase's time per block of the deepest width cell, times 32 blocks: a LLaMA-2-7B compression on
    this machine, at the cell's calibration size."""
    lines, hosts = [], host_labels(cells)
    for allocator in sorted({c["allocator"] for c in cells if c["suite"] == "width"}):
        c = max((c for c in cells if c["suite"] == "width" and c["allocator"] == allocator), key=lambda c: c["blocks"])
        if not lines:
            lines = ["", "## Extrapolated: a 32-block LLaMA-2-7B on this machine", "",
                     "Each phase's seconds per block in the deepest `width` cell, times 32 (every phase is one pass "
                     "over the blocks), at that cell's calibration size; the embeddings and head add a few seconds.",
                     "", "| allocator | from | calibrate + decompose h | allocate h | factorize h | total h |",
                     "|---|---|---|---|---|---|"]
        phases = [c["timings"].get(k, 0.0) / c["blocks"] * 32 / 3600
                  for k in ("calibrate + decompose", "allocate", "factorize")]
        shared = shared_cpu(c) if c.get("others_cpu_cores") is None else f"others' CPU {shared_cpu(c)}"
        lines.append(f"| {allocator} | {c['blocks']} blocks, {c['nsamples']} x {c['seqlen']} tokens, {shared}, cpu "
                     f"{hosts.get(c.get('cpu'), '?')} | "
                     + " | ".join(f"{h:.1f}" for h in phases) + f" | {sum(phases):.1f} |")
    return lines


REAL_MODELS = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "LLaMA-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}


def estimate_real(shape: dict, allocator: str, dtype: str, device: str):
    from transformers import LlamaConfig

    from rankcut import CalibrationConfig, CompressionConfig
    from rankcut._settings import resolve_dtype
    from rankcut.estimate import estimate_compression

    run = CompressionConfig(keep_ratio=0.8, allocator=allocator,
                            calibration=CalibrationConfig("c4", "validation", 256, 512))
    return estimate_compression(LlamaConfig(**shape, max_position_embeddings=4096), run, dtype=resolve_dtype(dtype),
                                device=device)


def check_equivalence(device: str) -> None:
    """A tiny random LLaMA through both paths on ``device``: the same plan and bit-identical tensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    import rankcut
    from rankcut.compress import compress_checkpoint

    config = LlamaConfig(**SHAPES["tiny"], num_hidden_layers=3, max_position_embeddings=256)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="rankcut-equivalence-") as scratch:
        folder = Path(scratch)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder / "dense")
        for allocator in ("uniform", "zerosum"):
            run = rankcut.CompressionConfig(keep_ratio=0.6, allocator=allocator)
            model = AutoModelForCausalLM.from_pretrained(folder / "dense").to(device)
            model, report = rankcut.compress(model, run, calibration=ids, show_progress=False)
            rankcut.save(model, None, folder / f"memory-{allocator}", report)
            streamed = compress_checkpoint(folder / "dense", run, folder / f"streamed-{allocator}", calibration=ids,
                                           device=device, show_progress=False)
            tensors = [{k: v for shard in sorted((folder / f"{kind}-{allocator}").glob("model-*.safetensors"))
                        for k, v in load_file(shard).items()} for kind in ("memory", "streamed")]
            same = tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k])
                                                                  for k in tensors[0])
            print(f"{device} {allocator}: same plan {streamed.plan.ranks == report.plan.ranks}, same tensors {same}")
            if not (same and streamed.plan.ranks == report.plan.ranks):
                raise SystemExit(f"streamed and in-memory differ on {device} ({allocator})")


def main() -> None:
    if sys.argv[1:2] == ["--check-cuda-equivalence"]:
        check_equivalence("cuda")
        return
    if sys.argv[1:2] == ["--check-nccl"]:
        check_launched("cuda")
        return
    if sys.argv[1:2] == ["--cell"]:
        folder, allocator, nsamples, seqlen, out, device, dtype = sys.argv[2:9]
        record = run_cell(Path(folder), allocator, int(nsamples), int(seqlen), Path(out), device, dtype)
        Path(out).with_name(f"{Path(out).name}.rank{record['rank']}.json").write_text(json.dumps(record))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", help=f"any of {sorted([*PLANS, 'distributed'])}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--allocators", nargs="+", help="only these allocators of the suites")
    parser.add_argument("--blocks", nargs="+", type=int, help="only these block counts of the suites")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of cell records")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args()
    if unknown := sorted(set(args.suites) - {*PLANS, "distributed"}):
        parser.error(f"unknown suite(s) {unknown}; choose from {sorted([*PLANS, 'distributed'])}")
    for suite in args.suites:
        if suite == "distributed":
            measure_distributed(args.results, args.allocators)
        else:
            measure(suite, args.threads, args.results, args.allocators, args.blocks)
    if args.render:
        render(args.results, args.page)


if __name__ == "__main__":
    main()
