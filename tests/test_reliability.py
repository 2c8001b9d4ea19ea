"""Reliability and safety: resumable runs, atomic outputs, a clear message for every bad input,
no unpickling and no code from model folders."""

import errno
import importlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from typer.testing import CliRunner

import rankcut
from conftest import VOCAB, calibration_ids, shard_holding, tiny_model
from rankcut import CalibrationConfig, CompressionConfig, compress
from rankcut.artifacts import MANIFEST, RankcutConfig, _write_manifest
from rankcut.cli import app
from rankcut.data import load_text
from rankcut.errors import ArtifactError, ConfigError, DataNotFoundError, FactorizationError, RankcutError
from rankcut.workdir import WorkDir, write_atomically, write_json

compress_module = importlib.import_module("rankcut.compress")  # `rankcut.compress` is the function
workdir_module = importlib.import_module("rankcut.workdir")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=calibration_ids(2, 16, seed=5) if ids is None else ids).logits


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the user would have seen
    return result


def assert_clear_failure(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def rewrite_config(folder: Path, edit) -> None:
    """Edit an artifact's config.json and re-hash it, as a consistent (not merely tampered) artifact."""
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / MANIFEST).unlink()
    _write_manifest(folder)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, word_tokenizer):
    """A small saved artifact with plain factors; tests copy it before editing."""
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6, factor_format="plain"),
                             calibration=calibration_ids(),
                             show_progress=False)
    return rankcut.save(model, word_tokenizer, tmp_path_factory.mktemp("artifact") / "art", report)


@pytest.fixture()
def artifact_copy(artifact, tmp_path):
    return Path(shutil.copytree(artifact, tmp_path / "art"))


# ---------------------------------------------------------------------------------------------
# Resuming


class Crash(Exception):
    """Stands in for a kill: the run stops in the middle of a block."""


@pytest.fixture()
def decompositions(monkeypatch):
    """Records the index of every block decomposed; ``crash_at = k`` raises on the k-th (from 0)."""
    recorder = SimpleNamespace(calls=[], crash_at=None)
    original, compensating = compress_module._Decomposer.spectra, compress_module._Decomposer.compensating

    def record(index):
        if recorder.crash_at is not None and len(recorder.calls) == recorder.crash_at:
            raise Crash(f"block {index}")
        recorder.calls.append(index)

    def spectra(self, run):
        record(run.index)
        return original(self, run)

    def compensating_group(self, statistics, *args):  # one call per input group: 4 per block
        record(int(statistics.modules[0].split(".")[2]))
        return compensating(self, statistics, *args)

    monkeypatch.setattr(compress_module._Decomposer, "spectra", spectra)
    monkeypatch.setattr(compress_module._Decomposer, "compensating", compensating_group)
    return recorder


def run_compress(work=None, model=None, config=None, ids=None):
    return compress(tiny_model() if model is None else model,
                    config or CompressionConfig(keep_ratio=0.6, allocator="energy", closed_loop="none"),
                    calibration=calibration_ids() if ids is None else ids, show_progress=False, work_dir=work)


@pytest.mark.parametrize("closed_loop", ["none", "sequential", "compensate", "correct"])
def test_interrupted_run_resumes_to_an_identical_result(tmp_path, decompositions, closed_loop):
    sequential = closed_loop != "none"
    rounds = {"correction_rounds": 2, "correction_windows": 4} if closed_loop == "correct" else {}
    config = CompressionConfig(keep_ratio=0.6, allocator="energy", closed_loop=closed_loop, **rounds)
    reference, expected = run_compress(config=config)
    # 3 blocks. Open loop: stop in block 2. Closed loop: the open-loop pass (3 decompositions) and the
    # plan are done, and the closed loop stops in its block 1 (compensate: at its second input group;
    # correct: in its second round).
    decompositions.calls.clear()
    decompositions.crash_at = {"none": 2, "sequential": 4, "compensate": 3 + 4 + 1, "correct": 3 + 3 + 1}[closed_loop]
    with pytest.raises(Crash):
        run_compress(tmp_path / "work", config=config)
    assert (tmp_path / "work" / "plan.json").exists() == sequential
    decompositions.calls.clear()
    decompositions.crash_at = None
    model, report = run_compress(tmp_path / "work", config=config)
    redone = {"none": [2], "sequential": [1, 2], "compensate": [1] * 4 + [2] * 4, "correct": [1, 2]}[closed_loop]
    assert decompositions.calls == redone  # finished blocks (and rounds) are not redone
    assert report.plan.to_dict() == expected.plan.to_dict()
    assert list(report.plan.ranks) == list(expected.plan.ranks)  # same order too
    assert list(report.diagnostics.items()) == list(expected.diagnostics.items())
    assert torch.equal(logits(model), logits(reference))


def test_work_folder_of_the_single_activations_layout_resumes(tmp_path, decompositions):
    """Folders made before the parity pair hold one ``activations.safetensors``: they resume, not restart."""
    reference, expected = run_compress()
    decompositions.calls.clear()
    decompositions.crash_at = 2
    with pytest.raises(Crash):
        run_compress(tmp_path / "work")
    spectra = tmp_path / "work" / "spectra"
    *older, newest = sorted(spectra.glob("activations-*.safetensors"), key=lambda p: p.stat().st_mtime)
    newest.rename(spectra / "activations.safetensors")
    for path in older:
        path.unlink()
    decompositions.calls.clear()
    decompositions.crash_at = None
    model, report = run_compress(tmp_path / "work")
    assert decompositions.calls == [2]
    assert report.plan.to_dict() == expected.plan.to_dict()
    assert torch.equal(logits(model), logits(reference))


def test_resume_after_allocation_skips_calibration_and_allocation(tmp_path, decompositions, monkeypatch):
    reference, expected = run_compress()

    def crash(*args, **kwargs):
        raise Crash("factorize")

    with monkeypatch.context() as patch:
        patch.setattr(compress_module, "_replace", crash)
        with pytest.raises(Crash):
            run_compress(tmp_path / "work")
    decompositions.calls.clear()
    model, report = run_compress(tmp_path / "work")
    assert decompositions.calls == [] and "allocate" not in report.timings
    assert report.plan.to_dict() == expected.plan.to_dict()
    assert torch.equal(logits(model), logits(reference))


@pytest.mark.parametrize("change, field", [
    ("settings", "settings.keep_ratio"),
    ("model", "model.weights_sha256"),
    ("calibration", "calibration_sha256"),
])
def test_work_folder_of_a_different_run_is_refused(tmp_path, change, field):
    run_compress(tmp_path / "work")
    changed = {"settings": dict(config=CompressionConfig(keep_ratio=0.5, allocator="energy", closed_loop="none")),
               "model": dict(model=tiny_model(seed=1)),
               "calibration": dict(ids=calibration_ids(seed=1))}[change]
    with pytest.raises(ConfigError, match=rf"made by a different run \(it differs in {field}\); delete it or pass "
                                          "another --work-dir"):
        run_compress(tmp_path / "work", **changed)


def test_only_work_folders_are_used_and_one_process_at_a_time(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a rankcut work folder"):
        run_compress(mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        run_compress(tmp_path / "file")
    with WorkDir.open(tmp_path / "work", {"format": 1}):
        with pytest.raises(ConfigError, match="in use by another rankcut process"):
            WorkDir.open(tmp_path / "work", {"format": 1})
    WorkDir.open(tmp_path / "work", {"format": 1}).close()  # released


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, decompositions):
    decompositions.crash_at = 2
    with pytest.raises(Crash):
        run_compress(tmp_path / "work")
    activations = max((tmp_path / "work" / "spectra").glob("activations-*.safetensors"), key=lambda p: p.stat().st_mtime)
    activations.write_bytes(activations.read_bytes()[:100])
    decompositions.crash_at = None
    with pytest.raises(RankcutError, match=r"activations-\d.safetensors is unreadable .*delete the work folder"):
        run_compress(tmp_path / "work")


def test_disk_full_while_checkpointing(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(workdir_module, "save_file", disk_full)
    with pytest.raises(RankcutError, match="the disk is full: free some space or pass another --work-dir"):
        run_compress(tmp_path / "work")
    assert not list((tmp_path / "work" / "spectra").iterdir())  # no temporary file left behind


def test_atomic_write_helper_shared_by_checkpoints_and_caches(tmp_path):
    path = tmp_path / "table.json"
    names = []

    def write(temporary):
        names.append(temporary.name)
        temporary.write_text("old")

    write_atomically(path, write)
    write_atomically(path, write, unique=True)  # concurrent writers of a shared cache: one temporary each
    assert names == [".table.json.tmp", f".table.json.{os.getpid()}.tmp"]
    write_json(path, {"a": 1}, indent=None, unique=True)
    assert path.read_text() == '{"a": 1}'

    def disk_full(temporary):
        temporary.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(RankcutError, match=r"could not write the cache .*table\.json .*the disk is full: free some "
                                           "space or use another folder"):
        write_atomically(path, disk_full, what="cache", elsewhere="use another folder", unique=True)
    assert path.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_killed_cli_run_resumes_to_identical_plan_and_logits(tmp_path, word_tokenizer, data_dir):
    """A real ``kill -9`` in the middle of calibration, then the same command again."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RANKCUT_DATA": str(data_dir)}

    def command(out):
        return [sys.executable, "-m", "rankcut.cli", "compress", "--model", str(folder), "--keep", "0.6",
                "--allocator", "energy", "--calib", "wikitext2", "--calib-split", "validation",
                "--nsamples", "64", "--seqlen", "64", "--out", str(out)]

    work = tmp_path / "resumed.work"
    with (tmp_path / "reference.log").open("w") as log:  # runs meanwhile, uninterrupted
        reference = subprocess.Popen(command(tmp_path / "reference"), env=env, stdout=log, stderr=log)
    try:
        victim = subprocess.Popen(command(tmp_path / "resumed"), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        try:  # wait for the first block's checkpoint
            while not any((work / "spectra").glob("activations-*.safetensors")):
                assert victim.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline, "no block checkpoint appeared"
                time.sleep(0.01)
        finally:
            victim.kill()  # SIGKILL: kill -9
            victim.wait()
        assert victim.returncode == -signal.SIGKILL
        assert not (work / "plan.json").exists() and not (tmp_path / "resumed").exists()  # killed mid-calibration

        resumed = subprocess.run(command(tmp_path / "resumed"), env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming from the checkpoints" in resumed.stderr
        assert not work.exists()  # deleted after the successful save
        assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()
    finally:
        reference.kill()
        reference.wait()

    plans = [json.loads((tmp_path / name / "rankcut_report.json").read_text())["plan"]
             for name in ("reference", "resumed")]
    assert plans[0] == plans[1]
    ids = calibration_ids(2, 64, seed=3)
    expected, actual = (logits(rankcut.load(tmp_path / name, device="cpu")[0], ids)
                        for name in ("reference", "resumed"))
    assert torch.equal(expected, actual)


def test_cli_keeps_the_work_folder_only_when_asked(tiny_folder, tmp_path, data_dir):
    args = ["compress", "--model", tiny_folder, "--keep", "0.6", "--calib", "wikitext2", "--nsamples", "4",
            "--seqlen", "32", "--data-dir", data_dir]
    assert run_cli(*args, "--out", tmp_path / "a").exit_code == 0
    assert not (tmp_path / "a.work").exists()
    result = run_cli(*args, "--out", tmp_path / "b", "--work-dir", tmp_path / "w", "--keep-work")
    assert result.exit_code == 0 and "work folder kept" in result.stderr
    assert (tmp_path / "w" / "run.json").is_file() and (tmp_path / "w" / "plan.json").is_file()


# ---------------------------------------------------------------------------------------------
# Atomic outputs


def _raise_disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _raise_safetensors_disk_full(*args, **kwargs):  # what safetensors raises for an OS write error
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                          'message: "No space left on device" })')


@pytest.mark.parametrize("target, replacement", [
    ("rankcut.artifacts.save_file", _raise_disk_full),
    ("rankcut.artifacts.save_file", _raise_safetensors_disk_full),
    ("pathlib.Path.write_text", _raise_disk_full),  # the reports and the manifest
], ids=["weights", "weights-safetensors-error", "reports"])
def test_disk_full_while_saving_leaves_nothing(tmp_path, monkeypatch, target, replacement):
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6), calibration=calibration_ids(),
                             show_progress=False)
    previous = rankcut.save(model, None, tmp_path / "art", report)
    monkeypatch.setattr(target, replacement)
    with pytest.raises(ArtifactError, match="the disk is full: free some space or choose another --out. "
                                            "Nothing was written to"):
        rankcut.save(model, None, tmp_path / "new", report)
    with pytest.raises(ArtifactError, match="disk is full"):
        rankcut.save(model, None, tmp_path / "art", report, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no partial folder, the old artifact intact
    rankcut.load(previous, device="cpu")


def test_overwrite_replaces_an_artifact_and_nothing_else(artifact_copy, tmp_path):
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.5), calibration=calibration_ids(),
                             show_progress=False)
    rankcut.save(model, None, artifact_copy, report, overwrite=True)
    assert rankcut.load(artifact_copy, device="cpu")[0].config.quantization_config.settings["keep_ratio"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the old one is gone, no leftovers
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="not a rankcut artifact; --overwrite replaces only artifacts"):
        rankcut.save(model, None, mine, report, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_cli_checks_out_before_loading_anything(tmp_path):
    (tmp_path / "file").write_text("")
    # the model does not exist: the --out error must come first
    assert_clear_failure(run_cli("compress", "--model", "no-such-model", "--out", tmp_path / "file", "--overwrite"),
                         "is a file; --out must be a folder path")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "data.csv").write_text("1,2")
    assert_clear_failure(run_cli("compress", "--model", "no-such-model", "--out", tmp_path / "folder", "--overwrite"),
                         "is a folder that is not a rankcut artifact")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message and exit status 2, never a traceback or a silent wrong result


invalid_keep = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                         st.sampled_from([math.nan, math.inf, -math.inf]))


@FAST
@given(keep=invalid_keep)
def test_keep_ratio_outside_zero_one_is_refused(keep):
    with pytest.raises(ConfigError, match=r"keep_ratio must be in \(0, 1\]"):
        CompressionConfig(keep_ratio=keep)


@FAST
@given(keep=st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_keep_ratio_inside_zero_one_is_accepted(keep):
    assert CompressionConfig(keep_ratio=keep).keep_ratio == keep


@FAST
@given(keep=invalid_keep)
def test_cli_keep_ratio_outside_zero_one(tmp_path, keep):
    assert_clear_failure(run_cli("compress", "--keep", repr(keep), "--out", tmp_path / "o"),
                         "keep_ratio must be in (0, 1]")


calibration_settings = st.one_of(
    st.tuples(st.just("nsamples"), st.integers(max_value=0)),
    st.tuples(st.just("seqlen"), st.integers(max_value=1)),
    st.tuples(st.just("batch_size"), st.integers(max_value=0)),
)


@FAST
@given(setting=calibration_settings)
def test_non_positive_calibration_sizes_are_refused(setting):
    name, value = setting
    with pytest.raises(ConfigError, match=f"calibration {name} must be an integer >= "):
        CompressionConfig(calibration=CalibrationConfig(**{name: value}))


@FAST
@given(setting=calibration_settings)
def test_cli_non_positive_calibration_sizes(tmp_path, setting):
    name, value = setting
    assert_clear_failure(run_cli("compress", f"--{name.replace('_', '-')}={value}", "--out", tmp_path / "o"),
                         f"calibration {name} must be an integer")


@pytest.mark.parametrize("value", [2.5, True, "8", None])
def test_calibration_sizes_must_be_integers(value):
    with pytest.raises(ConfigError, match="calibration nsamples must be an integer"):
        CalibrationConfig(nsamples=value).validate()


def test_model_without_target_linear_modules(tiny_folder, tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ConfigError, match="no list of repeated blocks with linear layers"):
        compress(gpt2, CompressionConfig(), calibration=calibration_ids(2, 8), show_progress=False)
    assert_clear_failure(run_cli("compress", "--model", tiny_folder, "--exclude", "*", "--out", tmp_path / "o"),
                         "has no target linear modules (after exclude=['*'])")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_calibration_activations(value):
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = value
    ids = calibration_ids()
    ids[0, 0] = 5
    with pytest.raises(RankcutError, match="calibration activations contain NaN or Inf"):
        compress(model, CompressionConfig(keep_ratio=0.5), calibration=ids, show_progress=False)


def test_inf_weight_under_whitening_names_the_module():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.inf
    with pytest.raises(FactorizationError, match=r"model\.layers\.1\.mlp\.down_proj: weight contains NaN or Inf"):
        compress(model, CompressionConfig(keep_ratio=0.5), calibration=calibration_ids(), show_progress=False)


def test_too_little_calibration_text(tmp_path, word_tokenizer):
    lines = tmp_path / "short.txt"
    lines.write_text("the of and " * 20)
    config = CompressionConfig(calibration=CalibrationConfig(dataset=str(lines), nsamples=4, seqlen=32))
    with pytest.raises(ConfigError, match="has 60 tokens, fewer than the 4 x 32 requested for calibration"):
        compress(tiny_model(), config, tokenizer=word_tokenizer, show_progress=False)
    documents = tmp_path / "short.jsonl"
    documents.write_text("".join(json.dumps({"text": "the of and " * 5}) + "\n" for _ in range(10)))
    config = CompressionConfig(calibration=CalibrationConfig(dataset=str(documents), nsamples=4, seqlen=32))
    with pytest.raises(ConfigError, match="has only 0 documents of at least 32 tokens.*lower --nsamples or --seqlen"):
        compress(tiny_model(), config, tokenizer=word_tokenizer, show_progress=False)


@pytest.mark.parametrize("ids, message", [
    (calibration_ids(2, 300), "seqlen 300 is beyond the model's context length 256"),
    (torch.full((2, 8), VOCAB + 7), "outside the model's vocabulary of 512"),
    (calibration_ids().float(), "tensor of token ids"),
    (calibration_ids()[0], "tensor of token ids"),
])
def test_bad_calibration_ids_are_refused_before_running_the_model(ids, message):
    with pytest.raises(ConfigError, match=message):
        compress(tiny_model(), CompressionConfig(), calibration=ids, show_progress=False)


def test_unreadable_data_files(tmp_path, monkeypatch, tiny_folder):
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(DataNotFoundError, match="garbage.txt: it is not UTF-8 text"):
        load_text(garbage)
    named = tmp_path / "data" / "wikitext-2-raw" / "wiki.valid.raw"
    named.parent.mkdir(parents=True)
    named.write_bytes(garbage.read_bytes())
    with pytest.raises(DataNotFoundError, match="wiki.valid.raw: it is not UTF-8 text"):
        load_text("wikitext2", "validation", data_dir=tmp_path / "data")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataNotFoundError, match="cannot read .*broken.parquet"):
        load_text(tmp_path / "broken.parquet")
    with pytest.raises(DataNotFoundError, match="is a folder; expected a .txt, .jsonl or .parquet file"):
        load_text(tmp_path / "data")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    read_text = Path.read_text

    def denied(self, *args, **kwargs):  # tests may run as root, which chmod cannot lock out
        if self == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(DataNotFoundError, match="cannot read .*locked.txt: .*Permission denied"):
        load_text(locked)
    monkeypatch.undo()
    assert_clear_failure(run_cli("compress", "--model", tiny_folder, "--calib", garbage, "--seqlen", "32",
                                 "--out", tmp_path / "o"),
                         "it is not UTF-8 text")


@pytest.mark.parametrize("where", ["config", "manifest"])
def test_artifact_from_a_newer_format_version(artifact_copy, where):
    if where == "config":
        rewrite_config(artifact_copy, lambda c: c["quantization_config"].update(format_version=99))
    else:
        manifest = json.loads((artifact_copy / MANIFEST).read_text())
        (artifact_copy / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    assert_clear_failure(run_cli("ppl", "--model", artifact_copy, "--max-windows", "1"),
                         "artifact format version 99 is newer than this rankcut supports (2); upgrade rankcut")


@pytest.mark.parametrize("name, description, message", [
    ("model.layers.0.mlp.up_proj", {"type": "magic", "rank": 3}, "invalid layer description"),
    ("model.layers.0.mlp.up_proj", {"type": "lowrank", "rank": True}, "invalid layer description"),
    ("model.layers.0.mlp.up_proj", {"type": "lowrank", "rank": 0}, "invalid layer description"),
    ("model.layers.0.mlp.up_proj", {"type": "lowrank", "rank": "3"}, "invalid layer description"),
    ("model.layers.0.mlp.up_proj", ["lowrank", 3], "invalid layer description"),
    ("", {"type": "lowrank", "rank": 3}, "invalid layer description"),
    ("model.layers.0.nope", {"type": "lowrank", "rank": 3}, "which the base architecture does not have"),
    ("model.layers.0", {"type": "lowrank", "rank": 3}, "not nn.Linear"),
    ("model.layers.0.mlp.up_proj", {"type": "lowrank", "rank": 10_000}, "exceeds its shape"),
    ("model.layers.0.mlp.up_proj", {"type": "lowrank", "rank": 3, "evil": 1}, "layer description .* is invalid"),
    ("model.layers.0.mlp.up_proj", {"type": "pivga", "rank": 3, "variant": "diagonal"}, "is invalid"),
])
def test_artifact_config_is_validated_before_use(artifact_copy, name, description, message):
    rewrite_config(artifact_copy, lambda c: c["quantization_config"]["modules"].__setitem__(name, description))
    with pytest.raises(ArtifactError, match=message):
        rankcut.load(artifact_copy)


@pytest.mark.parametrize("section", ["modules", "plan", "settings"])
def test_artifact_config_sections_must_be_objects(artifact_copy, section):
    rewrite_config(artifact_copy, lambda c: c["quantization_config"].__setitem__(section, ["not", "an", "object"]))
    with pytest.raises(ArtifactError, match=f"'{section}' must be a JSON object"):
        rankcut.load(artifact_copy)
    with pytest.raises(ArtifactError):
        RankcutConfig(**{section: 3})


@pytest.mark.parametrize("description, message", [
    ({"type": "pivga", "rank": 3, "variant": "column"}, "lack 3 factor tensor.*weight_coeff"),  # by the quantizer
    ({"type": "lowrank", "rank": 2}, "lack 2 factor tensor.*weight_a"),
])
def test_weights_that_do_not_match_the_config_are_refused(artifact_copy, description, message):
    """A consistent manifest, but the config describes layers the weights are not (a module stored dense
    described as factorized): never load random weights."""
    ranks = json.loads((artifact_copy / "config.json").read_text())["quantization_config"]["plan"]["ranks"]
    dense = next(name for name, rank in ranks.items() if rank == "dense")
    rewrite_config(artifact_copy, lambda c: c["quantization_config"]["modules"].__setitem__(dense, description))
    with pytest.raises(ArtifactError, match=message):
        rankcut.load(artifact_copy)


@pytest.mark.parametrize("breakage, message", [
    ("config-json", "is not a valid JSON file"),
    ("model-type", ": ValueError: "),
    ("field-type", ": StrictDataclassFieldValidationError: "),
    ("weights", "model.safetensors: not a whole safetensors file, truncated or damaged"),
    ("tokenizer", "holds no tokenizer"),
])
def test_broken_model_folders_get_a_clear_message(tiny_folder, tmp_path, breakage, message):
    config = json.loads((tiny_folder / "config.json").read_text())
    if breakage == "config-json":
        (tiny_folder / "config.json").write_text("{not json")
    elif breakage == "model-type":
        (tiny_folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    elif breakage == "field-type":
        (tiny_folder / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    elif breakage == "weights":
        (tiny_folder / "model.safetensors").write_bytes(os.urandom(4096))
    else:
        for path in tiny_folder.glob("tokenizer*"):
            path.unlink()
    result = run_cli("compress", "--model", tiny_folder, "--out", tmp_path / "o")
    assert_clear_failure(result, str(tiny_folder))
    assert message in result.stderr
    message = result.stderr[result.stderr.index("error:"):]  # after transformers' progress bars
    assert len(message.strip().splitlines()) == 1, message  # one line, however long the library's text


def test_unavailable_device_is_a_clear_error(tiny_folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_clear_failure(run_cli("compress", "--model", tiny_folder, "--device", "cuda", "--out", tmp_path / "o"),
                         "device 'cuda' is not available here")


# ---------------------------------------------------------------------------------------------
# Safety: no pickle, no remote code


def test_no_pickle_is_ever_loaded(artifact, tiny_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")]:
        monkeypatch.setattr(module, name, refuse)
    model, tokenizer = rankcut.load(artifact, device="cpu")
    assert torch.isfinite(logits(model)).all() and tokenizer is not None
    dense, _ = rankcut.load_model(tiny_folder, device="cpu")
    assert torch.isfinite(logits(dense)).all()


@pytest.mark.parametrize("rehash", [True, False], ids=["manifest-rehashed", "verify-off"])
def test_corrupt_weights_are_an_artifact_error_even_past_the_manifest(artifact_copy, rehash):
    weights = shard_holding(artifact_copy)
    weights.write_bytes(weights.read_bytes()[:1000])
    if rehash:
        (artifact_copy / MANIFEST).unlink()
        _write_manifest(artifact_copy)
    with pytest.raises(ArtifactError, match="could not load the weights .*SafetensorError"):
        rankcut.load(artifact_copy, verify=rehash)


@pytest.mark.parametrize("manifest, message", [
    ("{not json", "is unreadable"),
    (json.dumps({"format_version": 2}), "is unreadable"),
    (json.dumps({"format_version": 2, "files": {"x": {"bytes": "many"}}}), "is unreadable"),
    (json.dumps({"format_version": 2, "files": {"../config.json": {"bytes": 1, "sha256": "0"}}}), "outside the artifact"),
])
def test_broken_manifest_is_refused(artifact_copy, manifest, message):
    (artifact_copy / MANIFEST).write_text(manifest)
    with pytest.raises(ArtifactError, match=message):
        rankcut.load(artifact_copy)


def test_pickled_weights_in_an_artifact_are_never_read(artifact_copy):
    from safetensors.torch import load_file

    shards = sorted(artifact_copy.glob("model-*.safetensors"))
    torch.save({k: v for shard in shards for k, v in load_file(shard).items()}, artifact_copy / "pytorch_model.bin")
    for path in (*shards, artifact_copy / "model.safetensors.index.json"):
        path.unlink()
    (artifact_copy / MANIFEST).unlink()
    _write_manifest(artifact_copy)
    with pytest.raises(ArtifactError, match="could not load the weights"):
        rankcut.load(artifact_copy)


EVIL_CODE = """
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def add_remote_code(folder: Path, config: dict) -> None:
    (folder / "evil.py").write_text(EVIL_CODE)
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}


def test_code_shipped_in_a_folder_never_runs_unless_asked(tiny_folder, artifact_copy, tmp_path, monkeypatch):
    config = json.loads((tiny_folder / "config.json").read_text())
    add_remote_code(tiny_folder, config)
    (tiny_folder / "config.json").write_text(json.dumps(config))
    rankcut.load_model(tiny_folder, device="cpu")  # a known architecture: transformers' own class
    assert not (tiny_folder / "CODE_RAN").exists()
    (tiny_folder / "config.json").write_text(json.dumps({**config, "model_type": "only-in-evil-py"}))
    with pytest.raises(RankcutError, match="(?s)contains custom code .*trust_remote_code=True"):
        rankcut.load_model(tiny_folder, device="cpu")
    assert not (tiny_folder / "CODE_RAN").exists()

    rewrite_config(artifact_copy, lambda c: add_remote_code(artifact_copy, c))  # evil.py hashed in the manifest
    rankcut.load(artifact_copy, device="cpu")
    assert not (artifact_copy / "CODE_RAN").exists()

    seen = []

    def fake_compress(folder, config, out, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise RankcutError("stop here")

    monkeypatch.setattr("rankcut.models.checkpoint_folder", lambda spec: tiny_folder)
    monkeypatch.setattr(sys.modules["rankcut.compress"], "compress_checkpoint", fake_compress)
    for flags in ([], ["--trust-remote-code"]):
        run_cli("compress", "--model", "any", "--out", tmp_path / "o", *flags)
    assert seen == [False, True]
