"""The command line: exit codes, messages and files written (in process; one real subprocess)."""

import json
import os
import socket
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


def count_connects(monkeypatch) -> list:
    """Record every TCP connect (the hub probe's and any hub client's), refusing each at once."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(f"no network in this test ({address})")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_unknown_hub_id_with_the_hub_out_of_reach_fails_at_once(monkeypatch, tmp_path):
    """A name that could be a hub id, with no network: one probe of the hub, then the local cache
    only (no retries), and a message naming every place tried."""
    attempts = count_connects(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local hub cache
    result = run_cli("ppl", "--model", "no-such-model-anywhere", "--max-windows", "1")
    assert result.returncode == 2
    assert "model 'no-such-model-anywhere' not found; tried: bundled names" in result.stderr
    assert "local Hugging Face cache (the hub is out of reach)" in result.stderr
    assert len(attempts) == 1, attempts
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("spec", ["./typo-folder", "models/typo/folder", "~/typo-folder"])
def test_a_missing_path_fails_without_asking_the_hub(monkeypatch, spec):
    attempts = count_connects(monkeypatch)
    result = run_cli("ppl", "--model", spec, "--max-windows", "1")
    assert result.returncode == 2
    assert "not found; tried:" in result.stderr and "not a hub id (it names a path)" in result.stderr
    assert "(does not exist)" in result.stderr
    assert attempts == []


def test_loading_library_errors_become_one_line_with_the_fix(monkeypatch, tiny_folder):
    """A missing package (transformers' own ImportError/ValueError text names the pip command) is a
    one-line error with exit status 2, not a traceback."""
    from transformers import AutoConfig

    def missing_package(*args, **kwargs):
        raise ValueError("accelerate is required when loading a GGUF file `pip install accelerate`.\nmore detail")

    monkeypatch.setattr(AutoConfig, "from_pretrained", missing_package)
    result = run_cli("info", "--model", str(tiny_folder))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not load model" in lines[0] and "`pip install accelerate`" in lines[0], lines


def test_a_bug_in_rankcut_keeps_its_traceback(monkeypatch, tiny_folder):
    """Only the loading libraries' errors are translated: rankcut's own bugs propagate unchanged."""
    import rankcut.models

    def bug(*args, **kwargs):
        raise KeyError("a rankcut bug")

    monkeypatch.setattr(rankcut.models, "resolve_model_path", bug)
    with pytest.raises(KeyError, match="a rankcut bug"):
        run_cli("info", "--model", str(tiny_folder))


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


def test_compress_with_the_compensating_closed_loop_and_refinement(tiny_folder, tmp_path, data_dir):
    out = tmp_path / "compensated"
    result = run_cli("compress", "--model", str(tiny_folder), "--keep", "0.6", "--allocator", "uniform",
                     "--calib", "wikitext2", "--calib-split", "validation", "--nsamples", "8", "--seqlen", "64",
                     "--closed-loop", "compensate", "--compensation", "0.5", "--refine-steps", "3", "--out", str(out),
                     "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rankcut_report.json").read_text())
    assert report["config"]["closed_loop"] == "compensate" and report["config"]["refine_steps"] == 3
    assert report["config"]["compensation"] == 0.5
    assert all(d["fit"] == "compensating" and d["compensation"] == 0.5 and "refinement" in d
               for name, d in report["diagnostics"].items() if report["plan"]["ranks"][name] != "dense")


@pytest.mark.parametrize("args, message", [
    (["--keep", "1.5"], "keep_ratio must be in (0, 1]"),
    (["--keep", "0"], "keep_ratio must be in (0, 1]"),
    (["--allocator", "magic"], "unknown allocator 'magic'"),
    (["--allocator-option", "nokey"], "KEY=VALUE"),
    (["--whitening-option", "damping=lots"], "expects float"),
    (["--seqlen", "100000"], "beyond the model's context length"),
    (["--nsamples", "100000", "--seqlen", "200"], "calibration"),
    (["--closed-loop", "always"], "closed_loop must be one of"),
    (["--closed-loop", "sequential", "--refine-steps", "5"], "use closed_loop 'none', 'correct' or 'compensate'"),
    (["--closed-loop", "none", "--correction-rounds", "2"], "need closed_loop 'correct'"),
    (["--closed-loop", "correct", "--correction-step", "1.5"], "correction_step must be in (0, 1]"),
    (["--closed-loop", "compensate", "--refine-steps", "-2"], "refine_steps must be an integer >= 0"),
    (["--closed-loop", "compensate", "--compensation", "1.2"], "compensation must be in [0, 1]"),
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


def test_the_default_allocator_is_the_measured_best_for_its_cost(tiny_folder, tmp_path, data_dir):
    """zerosum: best WikiText-2 perplexity per allocation minute in benchmarks/RESULTS.md."""
    from rankcut import CompressionConfig

    assert CompressionConfig().allocator == "zerosum"
    out = tmp_path / "default"
    result = run_cli("compress", "--model", str(tiny_folder), "--calib", "wikitext2", "--nsamples", "4",
                     "--seqlen", "32", "--out", str(out), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "rankcut_report.json").read_text())["plan"]["allocator"] == "zerosum"


@pytest.mark.parametrize("given, stem", [
    ("results/smollm2-keep0.8", "results/smollm2-keep0.8"),
    ("results/smollm2-keep0.6", "results/smollm2-keep0.6"),
    ("results/run.json", "results/run"),
    ("results/run.md", "results/run"),
])
def test_eval_results_keep_the_dots_of_their_stem(tmp_path, given, stem):
    """Artifacts named by keep ratio must not overwrite each other's results (keep0.8 -> keep0.json)."""
    from rankcut.evaluation.suite import write_results

    json_path, md_path = write_results({"model": given}, tmp_path / given)
    assert (json_path, md_path) == (tmp_path / f"{stem}.json", tmp_path / f"{stem}.md")
    assert json.loads(json_path.read_text())["model"] == given and md_path.is_file()
