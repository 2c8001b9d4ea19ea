"""The command line: exit codes, messages and files written (in process; one real subprocess)."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rankcut.cli import app


def run_cli(*args, env_extra=None):
    result = CliRunner().invoke(app, list(args), env=env_extra)
    result.returncode = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_subprocess_error_has_no_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "rankcut.cli", "compress", "--keep", "2"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 2
    assert "keep_ratio must be in (0, 1]" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_exits_nonzero_naming_what_was_tried():
    result = run_cli("ppl", "--model", "no-such-model-anywhere", "--max-windows", "1")
    assert result.returncode != 0
    assert "could not load model 'no-such-model-anywhere'" in result.stderr
    assert "bundled names" in result.stderr and "hub id" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_exits_nonzero(tiny_folder, tmp_path):
    result = run_cli("ppl", "--model", str(tiny_folder), "--dataset", "wikitext2", "--data-dir", str(tmp_path / "empty"),
                     env_extra={"RANKCUT_DATA": ""})
    assert result.returncode != 0 and "not found. Tried" in result.stderr and "Traceback" not in result.stderr


def test_compress_then_ppl_on_the_artifact(tiny_folder, tmp_path, data_dir):
    out = tmp_path / "compressed"
    result = run_cli("compress", "--model", str(tiny_folder), "--keep", "0.6", "--allocator", "energy",
                     "--calib", "wikitext2", "--calib-split", "validation", "--nsamples", "8", "--seqlen", "64",
                     "--out", str(out), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rankcut_report.json").read_text())
    assert report["measured"]["target_params"] <= report["measured"]["budget"]
    assert (out / "rankcut_report.md").read_text().startswith("| quantity | value |")
    again = run_cli("compress", "--model", str(tiny_folder), "--out", str(out), "--data-dir", str(data_dir))
    assert again.returncode != 0 and "already exists" in again.stderr
    ppl = run_cli("ppl", "--model", str(out), "--max-windows", "2", "--seqlen", "64", "--data-dir", str(data_dir),
                  "--json", str(tmp_path / "ppl.json"))
    assert ppl.returncode == 0, ppl.stderr
    assert json.loads((tmp_path / "ppl.json").read_text())["windows"] == 2


@pytest.mark.parametrize("args, message", [
    (["--keep", "1.5"], "keep_ratio must be in (0, 1]"),
    (["--keep", "0"], "keep_ratio must be in (0, 1]"),
    (["--allocator", "magic"], "unknown allocator 'magic'"),
    (["--allocator-option", "nokey"], "KEY=VALUE"),
    (["--whitening-option", "damping=lots"], "expects float"),
    (["--seqlen", "100000"], "beyond the model's context length"),
    (["--nsamples", "100000", "--seqlen", "200"], "calibration"),
])
def test_bad_compress_input_gets_a_clear_message(tiny_folder, tmp_path, data_dir, args, message):
    result = run_cli("compress", "--model", str(tiny_folder), "--out", str(tmp_path / "o"), "--calib", "wikitext2",
                     "--data-dir", str(data_dir), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_info_lists_targets(tiny_folder):
    result = run_cli("info", "--model", str(tiny_folder))
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout and "model.layers.0.mlp.down_proj" in result.stdout


def test_eval_writes_json_and_markdown(tiny_folder, tmp_path, data_dir):
    out = tmp_path / "compressed"
    assert run_cli("compress", "--model", str(tiny_folder), "--keep", "0.6", "--calib", "wikitext2", "--nsamples", "4",
                   "--seqlen", "32", "--out", str(out), "--data-dir", str(data_dir)).returncode == 0
    result = run_cli("eval", "--model", str(out), "--ppl", "wikitext2", "--ppl", "c4", "--max-windows", "2",
                     "--seqlen", "32", "--speed", "--baseline", str(tiny_folder), "--data-dir", str(data_dir),
                     "--out", str(tmp_path / "res"))
    assert result.returncode == 0, result.output
    results = json.loads((tmp_path / "res.json").read_text())
    assert set(results["perplexity"]) == {"wikitext2", "c4"}
    assert results["perplexity"]["c4"]["split"] == "validation"
    assert results["speed"]["prefill_tokens_per_s"] > 0 and results["speed_ratio"]
    assert "| wikitext2 | test |" in (tmp_path / "res.md").read_text()
    assert run_cli("eval", "--model", str(out)).returncode == 2
