"""Compression across processes (torch.distributed, gloo on CPU): the same result as one process (bit for bit
but where a gradient is summed over the ranks' shares of more batches than ranks: then to float rounding).

Each test starts its ranks as separate processes, as ``torchrun`` would (``distributed_worker.py``), one
thread each, on a tiny random LLaMA; the one-process reference runs the same worker alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import calibration_ids, tiny_config
from test_streaming import artifact_tensors, saved

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(scenario: str, args: dict, world_size: int) -> list[subprocess.Popen]:
    """``world_size`` processes of ``scenario``, as torchrun starts them."""
    Path(args["out"]).mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, str(WORKER), scenario, json.dumps(args)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in processes]


def run(scenario: str, args: dict, world_size: int) -> None:
    for rank, (code, stderr) in enumerate(finish(start(scenario, args, world_size))):
        assert code == 0, f"rank {rank} failed:\n{stderr[-3000:]}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-block tiny LLaMA on disk in shards, and 10 calibration windows (5 batches of 2: uneven over 2
    ranks)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("distributed")
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = saved(AutoModelForCausalLM.from_config(config), folder / "dense", max_shard_size="100KB")
    ids = folder / "ids.pt"
    torch.save(calibration_ids(10, 32), ids)
    return model, ids


def compress_args(tmp: Path, name: str, checkpoint, config: dict, **extra) -> dict:
    folder, ids = checkpoint
    return {"folder": str(folder), "ids": str(ids), "artifact": str(tmp / name), "work": str(tmp / f"{name}.work"),
            "out": str(tmp / f"{name}.results"), "config": {"calibration": {"batch_size": 2}, **config}, **extra}


def results(args: dict, world_size: int) -> list[dict]:
    return [json.loads((Path(args["out"]) / f"rank-{rank}.json").read_text()) for rank in range(world_size)]


def spectra_files(work: Path) -> dict[str, torch.Tensor]:
    """Every full spectrum (u, sigma, b_full) in the open-loop checkpoints under ``work``, by tensor name."""
    found = {}
    for path in sorted(work.rglob("spectra/block-*.safetensors")):
        tensors = load_file(path)
        found.update({name: t for name, t in tensors.items()  # another rank's singular values: not its own
                      if not name.endswith("/sigma") or f"{name.removesuffix('/sigma')}/u" in tensors})
    return found


@pytest.mark.parametrize("config", [
    {"allocator": "uniform", "keep_ratio": 0.6, "closed_loop": "none"},
    {"allocator": "zerosum", "keep_ratio": 0.6, "closed_loop": "sequential", "allocator_options": {"windows": 4}},
    {"allocator": "uniform", "keep_ratio": 0.6, "closed_loop": "compensate", "anchor": 0.5, "refine_steps": 3},
    {"allocator": "uniform", "keep_ratio": 0.6, "closed_loop": "correct", "correction_windows": 4, "refine_steps": 2},
], ids=["uniform-open-loop", "zerosum-sequential", "uniform-compensate-anchored-refined", "uniform-correct-refined"])
def test_two_ranks_give_one_rank_s_artifact_bit_for_bit(tmp_path, checkpoint, config):
    alone = compress_args(tmp_path, "alone", checkpoint, config)
    shared = compress_args(tmp_path, "shared", checkpoint, config)
    run("compress", alone, 1)
    run("compress", shared, 2)
    one, two = results(alone, 1), results(shared, 2)
    assert two[0]["plan"] == two[1]["plan"] == one[0]["plan"]
    # refinement, where asked, trained and kept factors, the same on every rank
    assert two[0]["refined"] == two[1]["refined"] == one[0]["refined"]
    assert bool(one[0]["refined"]) == bool(config.get("refine_steps"))
    expected, got = artifact_tensors(Path(alone["artifact"])), artifact_tensors(Path(shared["artifact"]))
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)
    # every module decomposed exactly once across the ranks (per pass), and both ranks did some
    decomposed = two[0]["decomposed"] + two[1]["decomposed"]
    assert sorted(decomposed) == sorted(one[0]["decomposed"]) and two[0]["decomposed"] and two[1]["decomposed"]
    # the spectra each owner keeps are bitwise those of one process (hence its Grams too)
    reference, spectra = spectra_files(Path(alone["work"])), spectra_files(Path(shared["work"]))
    assert spectra.keys() == reference.keys() and all(torch.equal(spectra[k], reference[k]) for k in reference)


def test_no_rank_peaks_above_one_process(tmp_path):
    """Each rank holds its share of the activations and the Grams of the groups it owns: its peak stays
    at or below the one process's (a model wide enough that activations outweigh fixed costs)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 1024, 2
    torch.manual_seed(0)
    folder = saved(AutoModelForCausalLM.from_config(config), tmp_path / "wide")
    torch.save(calibration_ids(64, 256), tmp_path / "ids.pt")
    checkpoint = (folder, tmp_path / "ids.pt")
    alone = compress_args(tmp_path, "alone", checkpoint, {"allocator": "uniform", "keep_ratio": 0.6})
    shared = compress_args(tmp_path, "shared", checkpoint, {"allocator": "uniform", "keep_ratio": 0.6})
    run("compress", alone, 1)
    run("compress", shared, 2)
    single, ranks = results(alone, 1)[0]["peak_bytes"], [r["peak_bytes"] for r in results(shared, 2)]
    print(f"peak above start: one process {single / 2**20:.1f} MiB, ranks {[f'{b / 2**20:.1f}' for b in ranks]} MiB")
    assert max(ranks) <= single


def test_compress_in_memory_across_ranks_equals_one_process(tmp_path):
    """``rankcut.compress`` inside an initialized process group: every rank ends with the one-process
    model, bit for bit (zerosum, sequential closed loop)."""
    config = {"allocator": "zerosum", "keep_ratio": 0.6, "closed_loop": "sequential", "allocator_options": {"windows": 4},
              "calibration": {"batch_size": 2}}
    one, two = {"out": str(tmp_path / "one"), "config": config}, {"out": str(tmp_path / "two"), "config": config}
    run("in_memory", one, 1)
    run("in_memory", two, 2)
    expected = load_file(Path(one["out"]) / "rank-0.safetensors")
    for rank in range(2):
        got = load_file(Path(two["out"]) / f"rank-{rank}.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), rank


def test_data_parallel_gradients_equal_one_process(tmp_path):
    """zerosum's scores and the gated objective of ara/fermigrad/dobi (loss and gate gradients, CE and
    KL) with two ranks of one window each equal one rank with both windows."""
    one, two = {"out": str(tmp_path / "one"), "windows": 2}, {"out": str(tmp_path / "two"), "windows": 2}
    run("gradients", one, 1)
    run("gradients", two, 2)
    expected = load_file(Path(one["out"]) / "rank-0.safetensors")
    for rank in range(2):
        got = load_file(Path(two["out"]) / f"rank-{rank}.safetensors")
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert any(name.startswith("ce/") and expected[name].abs().sum() > 0 for name in expected)


def test_a_killed_rank_fails_the_run_clearly_and_the_rerun_resumes(tmp_path, checkpoint):
    config = {"allocator": "energy", "keep_ratio": 0.6, "closed_loop": "none"}
    reference = compress_args(tmp_path, "reference", checkpoint, config)
    run("compress", reference, 1)
    args = compress_args(tmp_path, "resumed", checkpoint, config, kill_rank=1, kill_block=1)
    started = time.monotonic()
    outcomes = finish(start("compress", args, 2), timeout=120)
    assert outcomes[1][0] == -9  # the victim
    code, stderr = outcomes[0]
    assert code != 0 and "rank 0 of 2: the processes lost contact" in stderr and "resumes" in stderr, stderr[-2000:]
    assert time.monotonic() - started < 120
    assert not Path(args["artifact"]).exists()
    args.pop("kill_rank")
    run("compress", args, 2)
    expected, got = artifact_tensors(Path(reference["artifact"])), artifact_tensors(Path(args["artifact"]))
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


def test_ranks_that_disagree_are_refused_naming_the_rank(tmp_path, checkpoint):
    """Rank 1 started with another keep ratio: both ranks refuse before any work, naming it."""
    base = compress_args(tmp_path, "mismatch", checkpoint, {"allocator": "uniform", "keep_ratio": 0.6})
    port, processes = free_port(), []
    for rank, keep in ((0, 0.6), (1, 0.5)):
        args = {**base, "config": {**base["config"], "keep_ratio": keep}}
        Path(args["out"]).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, str(WORKER), "compress", json.dumps(args)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for code, stderr in finish(processes, timeout=120):
        assert code != 0 and "rank 1 differs from rank 0 in settings.keep_ratio" in stderr, stderr[-2000:]
    assert not Path(base["artifact"]).exists()


def test_torchrun_command_line_writes_the_one_process_artifact(tmp_path, tiny_folder, data_dir):
    """The README's command: ``torchrun --nproc-per-node 2 -m rankcut compress ...`` (torch's launcher
    module, as the ``torchrun`` script runs it) gives the artifact of the same command in one process,
    and removes every rank's work folder. The default closed loop, the correction, sums its gradient over
    the ranks' halves of the windows (2 batches each, not 4 in a row): the same to float32 rounding."""
    def command(out: Path) -> list[str]:
        return ["-m", "rankcut", "compress", "--model", str(tiny_folder), "--out", str(out), "--allocator",
                "uniform", "--keep", "0.6", "--calib", "wikitext2", "--nsamples", "8", "--seqlen", "32",
                "--batch-size", "2", "--data-dir", str(data_dir)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = subprocess.run([sys.executable, *command(tmp_path / "alone")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               *command(tmp_path / "shared")], env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("rankcut compress") == 1  # rank 0 reports
    expected, got = artifact_tensors(tmp_path / "alone"), artifact_tensors(tmp_path / "shared")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not (tmp_path / "shared.work").exists()
