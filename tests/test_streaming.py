"""The streamed pipeline (compress_checkpoint): the same plans and bit-identical factors as compressing
the model in memory, one block's weights resident at a time, no file left mapped, clear errors for
broken checkpoints, and a resume after SIGKILL that gives the same artifact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankcut
from conftest import ARCHS, calibration_ids, tiny_model
from rankcut import CompressionConfig, compress
from rankcut.checkpoint import CheckpointSource, StreamedWeights
from rankcut.compress import compress_checkpoint
from rankcut.errors import CheckpointError
from test_cli import run_cli


def artifact_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for shard in sorted(folder.glob("model-*.safetensors")) for name, tensor in load_file(shard).items()}


def saved(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def compress_both(tmp_path: Path, model: torch.nn.Module, config: CompressionConfig, ids: torch.Tensor):
    """The in-memory result (saved) and the streamed one, from the same weights."""
    folder = saved(model, tmp_path / "dense")
    fresh = CheckpointSource.open(folder).skeleton()
    CheckpointSource.open(folder).stream(fresh).onload([""])
    in_memory, report = compress(fresh, config, calibration=ids, show_progress=False)
    rankcut.save(in_memory, None, tmp_path / "in-memory", report)
    streamed = compress_checkpoint(folder, config, tmp_path / "streamed", calibration=ids, show_progress=False)
    leftovers = {p.name for p in tmp_path.iterdir() if p.suffix != ".png"} - {"dense", "in-memory", "streamed", "cache"}
    assert not leftovers  # the temporary work folder (spectra on disk) and the staging folder are gone (plots stay)
    return report, streamed


STREAMED = {"uniform": {}, "energy": {}, "zerosum": {}, "strs": {"use_cache": False},  # strs: measure, both times
            "ara": {"steps": 2}, "fermigrad": {"steps": 2}, "dobi": {"steps": 2}}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("allocator", list(STREAMED))
def test_streamed_equals_in_memory(tmp_path, arch, allocator, monkeypatch):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    ids = calibration_ids(8, 24)
    config = CompressionConfig(keep_ratio=0.6, allocator=allocator, allocator_options=STREAMED[allocator])
    report, streamed = compress_both(tmp_path, tiny_model(arch), config, ids)
    assert streamed.plan.ranks == report.plan.ranks
    assert streamed.measured == report.measured
    expected, got = artifact_tensors(tmp_path / "in-memory"), artifact_tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    model, _ = rankcut.load(tmp_path / "streamed", device="cpu")
    reference, _ = rankcut.load(tmp_path / "in-memory", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(ids[:2]).logits, reference(ids[:2]).logits)


def test_sequential_streamed_equals_in_memory(tmp_path):
    config = CompressionConfig(keep_ratio=0.6, allocator="energy", closed_loop="sequential")
    report, streamed = compress_both(tmp_path, tiny_model(), config, calibration_ids(8, 24))
    expected, got = artifact_tensors(tmp_path / "in-memory"), artifact_tensors(tmp_path / "streamed")
    assert streamed.plan.ranks == report.plan.ranks
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split()) >= 6}


def resident_at_offloads(tmp_path: Path, monkeypatch, config: CompressionConfig) -> tuple[list[tuple[int, int]], int, int]:
    """Compress a deep tiny model, sharded on disk, checking at every offload that no checkpoint file is
    mapped; the materialized parameter counts at the offloads (inside the decoder blocks, outside them),
    and the dense model's counts of one block and of what lies outside the blocks."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    model_config = tiny_config("llama")
    model_config.num_hidden_layers = 12
    torch.manual_seed(0)
    folder = saved(AutoModelForCausalLM.from_config(model_config), tmp_path / "deep", max_shard_size="100KB")
    shards = {str(path) for path in folder.glob("*.safetensors")}
    assert len(shards) > 3
    resident: list[tuple[int, int]] = []
    offload = StreamedWeights.offload

    def checked_offload(self, prefixes):
        materialized = [(name, p.numel()) for name, p in self.model.named_parameters() if p.device.type != "meta"]
        in_blocks = sum(count for name, count in materialized if name.startswith("model.layers."))
        resident.append((in_blocks, sum(count for _, count in materialized) - in_blocks))
        assert not shards & mapped_files()
        offload(self, prefixes)

    monkeypatch.setattr(StreamedWeights, "offload", checked_offload)
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    compress_checkpoint(folder, config, tmp_path / "out", calibration=calibration_ids(4, 16), show_progress=False,
                        work_dir=tmp_path / "work")
    assert not shards & mapped_files()
    dense = dict(AutoModelForCausalLM.from_config(model_config).named_parameters())
    block = sum(p.numel() for name, p in dense.items() if name.startswith("model.layers.0."))
    return resident, block, sum(p.numel() for name, p in dense.items() if not name.startswith("model.layers."))


def assert_one_block_resident(resident: list[tuple[int, int]], block: int, outside: int, passes: int) -> None:
    """``passes`` passes over the 12 blocks, each with one block's weights at most (dense, or its factors
    beside or instead of them, which at keep 0.6 would exceed it) and the embeddings, head and final norm
    outside the blocks at most."""
    assert len(resident) >= passes * 12
    assert max(in_blocks for in_blocks, _ in resident) <= block
    assert max(outside_blocks for _, outside_blocks in resident) <= outside


@pytest.mark.parametrize("allocator", ["energy", "zerosum", "strs", "ara"])
def test_one_block_resident_and_no_file_left_mapped(tmp_path, monkeypatch, allocator):
    """At every offload no checkpoint file is mapped and the materialized parameters are those of one
    block at most (plus what lies outside the blocks), also through zerosum's forward and reverse sweep,
    strs's probe pass and ara's training steps."""
    resident = resident_at_offloads(tmp_path, monkeypatch, CompressionConfig(keep_ratio=0.6, allocator=allocator))
    # calibration, the allocator's (ara: a forward and a reverse sweep per step, 2 steps), factorization
    assert_one_block_resident(*resident, {"energy": 2, "zerosum": 4, "strs": 3, "ara": 6}[allocator])


@pytest.mark.parametrize("closed_loop, refine_steps", [("sequential", 0), ("compensate", 0), ("compensate", 2), ("none", 2)])
def test_closed_loops_keep_one_block_resident(tmp_path, monkeypatch, closed_loop, refine_steps):
    """The closed loops run the dense and the compressed block side by side (refinement trains them so):
    still one block's weights at most at every offload, and no file left mapped."""
    config = CompressionConfig(keep_ratio=0.6, allocator="energy", closed_loop=closed_loop, refine_steps=refine_steps)
    # calibration, then the closed loop's pass
    assert_one_block_resident(*resident_at_offloads(tmp_path, monkeypatch, config), passes=2)


@pytest.fixture()
def dense_folder(tmp_path, word_tokenizer) -> Path:
    folder = tmp_path / "dense"
    tiny_model().save_pretrained(folder, max_shard_size="200KB")
    word_tokenizer.save_pretrained(folder)
    return folder


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def break_checkpoint(folder: Path, breakage: str) -> str:
    """Damage the sharded checkpoint; return the file the error must name."""
    weight_map = index_of(folder)["weight_map"]
    shard = folder / weight_map["model.layers.1.mlp.up_proj.weight"]
    if breakage == "missing-shard":
        shard.unlink()
    elif breakage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif breakage == "index-mismatch":
        tensors = load_file(shard)
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, shard, metadata={"format": "pt"})
    else:  # shape
        tensors = load_file(shard)
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
        save_file(tensors, shard, metadata={"format": "pt"})
    return shard.name


@pytest.mark.parametrize("breakage, message", [
    ("missing-shard", "missing shard"),
    ("truncated-shard", "not a whole safetensors file"),
    ("index-mismatch", "does not hold model.layers.1.mlp.up_proj.weight"),
    ("shape", "model.layers.1.mlp.up_proj.weight has shape [95, 64], the config implies [96, 64]"),
])
def test_broken_checkpoints_are_one_line_errors_naming_the_file(dense_folder, tmp_path, data_dir, breakage, message):
    culprit = break_checkpoint(dense_folder, breakage)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        CheckpointSource.open(dense_folder)
    result = run_cli("compress", "--model", str(dense_folder), "--out", str(tmp_path / "o"), "--calib", "wikitext2",
                     "--nsamples", "4", "--seqlen", "32", "--data-dir", str(data_dir))
    assert result.returncode == 2 and message in result.stderr and culprit in result.stderr
    assert len(result.stderr[result.stderr.index("error:"):].strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_compressed_artifact_is_not_compressed_again(tmp_path):
    compress_both(tmp_path, tiny_model(), CompressionConfig(keep_ratio=0.6, allocator="uniform"), calibration_ids(4, 16))
    with pytest.raises(CheckpointError, match="already quantized or compressed .*'rankcut'"):
        CheckpointSource.open(tmp_path / "streamed")


def compress_command(folder: Path, out: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rankcut.cli", "compress", "--model", str(folder), "--out", str(out),
            "--allocator", "energy", "--keep", "0.6", "--calib", "wikitext2", "--nsamples", "64", "--seqlen", "64",
            "--batch-size", "2", "--data-dir", str(data_dir)]


def test_a_streamed_run_killed_mid_way_resumes_to_an_identical_artifact(tmp_path, data_dir, word_tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    folder = saved(AutoModelForCausalLM.from_config(config), tmp_path / "dense", max_shard_size="200KB")
    word_tokenizer.save_pretrained(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(compress_command(folder, tmp_path / "reference", data_dir), check=True, env=env,
                   capture_output=True, timeout=600)
    process = subprocess.Popen(compress_command(folder, tmp_path / "resumed", data_dir), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "resumed.work" / "spectra" / "block-0002.safetensors"
    deadline = time.monotonic() + 300
    while not progress.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert progress.exists() and not (tmp_path / "resumed").exists()  # killed mid-way, nothing published
    rerun = subprocess.run(compress_command(folder, tmp_path / "resumed", data_dir), env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from the checkpoints" in rerun.stderr
    expected, got = artifact_tensors(tmp_path / "reference"), artifact_tensors(tmp_path / "resumed")
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("text, size", [("12GiB", 12 * 2**30), ("500MB", 500 * 10**6), ("1.5 TB", 1.5e12),
                                        ("64G", 64 * 10**9), ("4096", 4096), ("0.5GiB", 2**29)])
def test_memory_sizes_parse(text, size):
    from rankcut.estimate import parse_memory

    assert parse_memory(text) == int(size)


@pytest.mark.parametrize("text", ["lots", "-1GB", "12 parsecs", "", "0GB", "1.2.3G"])
def test_nonsense_memory_sizes_are_rejected(text):
    from rankcut.errors import ConfigError
    from rankcut.estimate import parse_memory

    with pytest.raises(ConfigError, match="is not a positive amount"):
        parse_memory(text)


def test_the_estimate_grows_with_what_the_run_holds():
    from conftest import tiny_config
    from rankcut import CalibrationConfig
    from rankcut.estimate import estimate_compression

    config = tiny_config("llama")

    def host(allocator="uniform", nsamples=64, **options):
        run = CompressionConfig(keep_ratio=0.6, allocator=allocator, allocator_options=options, closed_loop="none",
                                calibration=CalibrationConfig("wikitext2", "validation", nsamples, 128))
        return estimate_compression(config, run)

    assert host(nsamples=256).host_bytes > host(nsamples=64).host_bytes
    assert host("uniform").host_bytes == host("energy").host_bytes
    assert host("zerosum").stages["allocate"] > host("uniform").stages["allocate"] == 0
    assert host("zerosum").disk_bytes > host("uniform").disk_bytes  # the sweep's saved block inputs
    assert host("zerosum", windows=64).stages["allocate"] > host("zerosum", windows=8).stages["allocate"]
    deep = tiny_config("llama")
    deep.num_hidden_layers *= 4
    for allocator in ("zerosum", "strs", "ara", "fermigrad", "dobi"):  # one block at a time, whatever the depth
        run = CompressionConfig(keep_ratio=0.6, allocator=allocator,
                                calibration=CalibrationConfig("wikitext2", "validation", 64, 128))
        shallow, deeper = (estimate_compression(c, run).stages["allocate"] for c in (config, deep))
        assert 0 < deeper == shallow, allocator
    assert host().peak_stage == "calibrate" and host().disk_bytes > 0


def test_a_run_predicted_over_the_memory_limit_is_refused_before_any_work(dense_folder, tmp_path, data_dir):
    result = run_cli("compress", "--model", str(dense_folder), "--out", str(tmp_path / "o"), "--calib", "wikitext2",
                     "--seqlen", "64", "--allocator", "uniform", "--data-dir", str(data_dir), "--max-memory", "100MB")
    assert result.returncode == 2
    assert "predicted to peak at" in result.stderr and "over the limit of 0.1 GiB" in result.stderr
    assert "--nsamples" in result.stderr  # what to change: calibration dominates here
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()
    dry = run_cli("compress", "--model", str(dense_folder), "--out", str(tmp_path / "o"), "--seqlen", "64", "--dry-run")
    assert dry.returncode == 0 and "peak host memory" in dry.stdout and "calibration activations" in dry.stdout
    assert not (tmp_path / "o").exists()
    nonsense = run_cli("compress", "--model", str(dense_folder), "--out", str(tmp_path / "o"), "--max-memory", "lots")
    assert nonsense.returncode == 2 and "is not a positive amount" in nonsense.stderr


def boundary_rss(tmp_path: Path, monkeypatch) -> list[int]:
    """The process's resident size after each block is let go, compressing a 10-block, 512-wide LLaMA."""
    from rankcut.memory import current_rss

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    shape = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
    folder = tmp_path / "model"
    if not folder.exists():
        scale.write_checkpoint(folder, shape, 10)
    trace: list[int] = []
    offload = StreamedWeights.offload

    def traced(self, prefixes):
        offload(self, prefixes)
        trace.append(current_rss())

    monkeypatch.setattr(StreamedWeights, "offload", traced)
    ids = torch.randint(0, 512, (16, 128), generator=torch.Generator().manual_seed(0))
    compress_checkpoint(folder, CompressionConfig(keep_ratio=0.8, allocator="uniform"), tmp_path / f"out{len(trace)}",
                        calibration=ids, show_progress=False, max_memory=1 << 50)
    return trace


def test_resident_memory_at_block_boundaries_does_not_grow_with_depth(tmp_path, monkeypatch):
    """glibc keeps freed multi-MB blocks in its heap; without giving them back after each block the
    resident size grew by tens of MB per block here."""
    trace = boundary_rss(tmp_path, monkeypatch)
    calibration = trace[1:11]  # after the embedding's release, one entry per block
    assert max(calibration[5:]) <= max(calibration[:3]) + 16 * 2**20, [round(t / 2**20) for t in calibration]
