"""One process of a distributed test run (``tests/test_distributed.py`` starts one per rank).

``python distributed_worker.py SCENARIO ARGS_JSON``, with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment as ``torchrun`` sets them; alone when ``WORLD_SIZE`` is 1. Each rank
writes what the test compares into ``ARGS["out"]/rank-R.*``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

torch.set_num_threads(1)  # every process, the one-rank reference included, computes with the same kernels
RANK, WORLD_SIZE = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def compress(args: dict, out: Path) -> None:
    """``compress_checkpoint``; records the spectra decomposed here, the plan and the peak memory. With
    ``kill_rank``/``kill_block`` that rank kills itself (SIGKILL) once it has checkpointed that block."""
    from rankcut.compress import CompressionConfig, compress_checkpoint
    from rankcut.workdir import BlockCheckpoints

    compress_module = sys.modules["rankcut.compress"]  # the package's name `compress` is the function
    decomposed = []
    whitened_svd = compress_module.whitened_svd

    def counted(weight, whitening, name, *rest, **kwargs):
        decomposed.append(name)
        return whitened_svd(weight, whitening, name, *rest, **kwargs)

    compress_module.whitened_svd = counted
    if args.get("kill_rank") == RANK:
        save_block = BlockCheckpoints.save_block

        def save_then_die(self, index, *rest, **kwargs):
            save_block(self, index, *rest, **kwargs)
            if index == args["kill_block"]:
                os.kill(os.getpid(), signal.SIGKILL)

        BlockCheckpoints.save_block = save_then_die
    ids = torch.load(args["ids"])
    report = compress_checkpoint(args["folder"], CompressionConfig.from_dict(args["config"]), args["artifact"],
                                 calibration=ids, work_dir=args["work"], show_progress=False)
    (out / f"rank-{RANK}.json").write_text(json.dumps({
        "decomposed": decomposed, "plan": report.plan.to_dict()["ranks"],
        "refined": sorted(name for name, d in report.diagnostics.items() if d.get("refinement", {}).get("kept")),
        "peak_bytes": report.memory["host_peak_bytes"] - report.memory["host_start_bytes"]}))


def in_memory(args: dict, out: Path) -> None:
    """``rankcut.compress`` of a tiny LLaMA held in memory; every rank saves the compressed state dict."""
    from conftest import calibration_ids, tiny_model
    from rankcut import CompressionConfig, compress

    model, report = compress(tiny_model(), CompressionConfig.from_dict(args["config"]), calibration=calibration_ids(6, 16),
                             show_progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"rank-{RANK}.safetensors")


def gradients(args: dict, out: Path) -> None:
    """zerosum's component scores and the training allocators' gated objective (loss and gate gradients)
    of a float64 tiny LLaMA, data parallel over the ranks."""
    from conftest import calibration_ids, tiny_model
    from rankcut.allocation.spectral import gated_objective
    from rankcut.allocation.zerosum import component_scores
    from rankcut.decomposition import whitened_svd
    from rankcut.distributed import Ranks
    from rankcut.sweep import ModelStream
    from rankcut.targets import find_targets
    from rankcut.whitening.base import IdentityWhitening

    model = tiny_model().double()
    targets = find_targets(model)
    spectra = {t.name: whitened_svd(model.get_submodule(t.name).weight, IdentityWhitening({}), t.name, torch.float64)
               for t in targets}
    stream = ModelStream(model, targets, ranks=Ranks.current())
    windows = calibration_ids(args["windows"], 16)
    results = {f"score/{name}": s for name, s in component_scores(stream, spectra, windows, 1).items()}
    gates = {t.name: torch.linspace(1.0, 0.1, spectra[t.name].full_rank // 2, dtype=torch.float64) for t in targets}
    for loss_kind in ("ce", "kl"):
        loss, gate_gradients = gated_objective(stream, spectra, loss=loss_kind)(windows, gates)
        results[f"{loss_kind}/loss"] = torch.tensor([loss], dtype=torch.float64)
        results.update({f"{loss_kind}/{name}": g.double() for name, g in gate_gradients.items()})
    save_file({k: v.contiguous() for k, v in results.items()}, out / f"rank-{RANK}.safetensors")


if __name__ == "__main__":
    scenario, arguments = sys.argv[1], json.loads(sys.argv[2])
    if WORLD_SIZE > 1:
        dist.init_process_group("gloo")
    try:
        {"compress": compress, "in_memory": in_memory, "gradients": gradients}[scenario](arguments, Path(arguments["out"]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
