"""The benchmark scripts end to end on a tiny model: compress_matrix.py fills cells (resuming the
evaluations a cell lacks from its artifact), make_results.py renders them."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rankcut.evaluation.speed import processor_name

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (registered in sys.modules, which dataclasses need)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str, first_column: str, after: str = "") -> list[dict[str, str]]:
    """The rows of the first Markdown table after the line ``after`` whose header starts with ``first_column``,
    as dicts."""
    lines = markdown.splitlines()
    begin = lines.index(after) if after else 0
    start = next(i for i, line in enumerate(lines) if i > begin and line.startswith(f"| {first_column} |"))
    def split(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip("|").split("|")]

    header, rows = split(lines[start]), []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, split(line))))
    return rows


def test_matrix_resumes_missing_evaluations_and_renders_them(tiny_folder, tmp_path, capsys):
    matrix, results_script = script("compress_matrix"), script("make_results")
    results, artifacts = tmp_path / "results", tmp_path / "artifacts"
    setting = ["--model", str(tiny_folder), "--keeps", "0.6", "--formats", "pivga", "--calib", "wikitext2:validation",
               "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--results", str(results)]
    common = setting + ["--eval", "wikitext2:test:2", "c4:validation:2"]
    cell_path = results / "uniform-pivga-cholesky-keep0.6-wikitext2.json"

    matrix.main(common + ["--artifacts", str(artifacts)])
    first = json.loads(cell_path.read_text())
    assert set(first["perplexity"]) == {"wikitext2:test:2", "c4:validation:2"} and "zeroshot" not in first
    assert first["compress_others_cpu_cores"] >= 0  # whether the compression ran alone is recorded
    assert not list(artifacts.glob("*.work"))  # the cell's compression work folder is gone once it is saved

    more = ["--dense", "--zeroshot", "--zeroshot-limit", "2", "--speed", "--speed-rounds", "2"]
    matrix.main(common + more)  # no artifact to load the cell from: only the dense row is filled
    assert "it lacks zero-shot" in capsys.readouterr().out
    assert json.loads(cell_path.read_text()) == first

    one_task = ["--zeroshot", "--zeroshot-limit", "2", "--zeroshot-tasks", "arc_easy", "--artifacts", str(artifacts)]
    matrix.main(common + one_task)  # zero-shot resumes by task: the other seven come next
    matrix.main(common + more + ["--artifacts", str(artifacts)])
    out = capsys.readouterr().out
    # each task once, for the cell (the dense row got them in the run before): arc_easy was not run again
    assert out.count("zero-shot arc_easy:") == 1 and out.count("zero-shot winogrande:") == 1
    cell = json.loads(cell_path.read_text())
    assert cell["report"] == first["report"] and cell["compress_seconds"] == first["compress_seconds"]
    assert cell["zeroshot"]["limit"] == 2 and len(cell["zeroshot"]["tasks"]) == 8
    assert cell["zeroshot"]["average_acc_stderr"] > 0
    rounds = cell["speed_rounds"]  # interleaved: dense first, then the cell first
    assert len(rounds) == 2 and list(rounds[0]) == ["dense", "compressed"] and list(rounds[1]) == ["compressed", "dense"]
    decode = [r["compressed"]["decode_tokens_per_s"] / r["dense"]["decode_tokens_per_s"] for r in rounds]
    assert cell["speed_ratio"]["decode_speedup_range"] == [min(decode), max(decode)]
    assert cell["speed"]["prompt_tokens"] == 512 and cell["speed_ratio"]["rounds"] == 2
    cpu = processor_name()  # times compare only within one host: every record names it
    assert first["environment"]["cpu"] == cpu and {r[side]["cpu"] for r in rounds for side in r} == {cpu}

    quality = setting + ["--eval", "wikitext2:test:2"]
    matrix.main(quality + ["--allocators", "zerosum"])  # an ablation: the default and a tagged variant
    matrix.main(quality + ["--allocators", "zerosum", "--tag=-floor",
                           "--allocator-options", '{"zerosum": {"min_rank_ratio": 0.3}}'])

    out, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text("intro\n<!-- headline results -->\nstale table\n<!-- /headline results -->\nafter\n")
    results_script.main(["--results", str(results), "--out", str(out), "--min-zeroshot-items", "2",
                         "--readme", str(readme)])
    page = out.read_text()
    rows = table_rows(page, "allocator")
    assert [row["allocator"] for row in rows] == ["dense", "uniform", "zerosum", "zerosum `-floor`"]
    wikitext, c4 = "WikiText-2 test ppl, 2 windows", "C4 ppl, 2 windows"
    for row in rows[:2]:
        for column in (wikitext, c4, "measured keep"):
            assert math.isfinite(float(row[column])), (column, row)
        accuracy, error = row["zero-shot avg acc"].split(" (")[0].split(" ± ")  # mean ± standard error
        assert 0 <= float(accuracy) <= 1 and float(error) > 0
    assert rows[0]["prefill ×dense"] == "1.00"
    assert re.fullmatch(r"(\d+\.\d\d|no measurable difference) \(\d+\.\d\d–\d+\.\d\d\)", rows[1]["decode ×dense"])
    # § where other processes shared the CPU meanwhile (as now, on a busy machine)
    assert math.isfinite(float(rows[1]["compress s"].rstrip("§"))) and math.isfinite(float(rows[1]["allocate s"]))
    for row in rows[2:]:  # (uniform − ppl) / (uniform − dense) on the windows all three share
        uniform, dense, mine = (float(r[wikitext]) for r in (rows[1], rows[0], row))
        assert row["gap closed"] == f"{(uniform - mine) / (uniform - dense):.0%}" and row[c4] == "—"
    compared = table_rows(page, "allocator", after="### Allocators at keep 0.6: pivga, cholesky, wikitext2 calibration")
    defaults = sorted(rows[1:3], key=lambda row: float(row[wikitext]))  # the tagged variant is left out
    assert [r["allocator"] for r in compared] == ["dense"] + [r["allocator"] for r in defaults]
    assert "≈" not in compared[0]["zero-shot avg acc"]  # the dense row is no match of itself
    assert [r[wikitext] for r in compared] == [r[wikitext] for r in [rows[0], *defaults]]
    ablation = table_rows(page, "variant")
    assert [(r["variant"], r["options changed"]) for r in ablation] == [("default", "—"),
                                                                        ("`-floor`", "min_rank_ratio=0.3")]
    change = float(rows[3][wikitext]) - float(rows[2][wikitext])
    assert abs(float(ablation[1]["Δ WikiText-2 vs default"]) - change) <= 0.011  # both from 2-decimal figures
    assert "first 2 items per task" in page
    assert len(table_rows(page, "cell")) == 2  # zero-shot per task: dense and the uniform cell
    compression = table_rows(page, "cell", after="### Compression")
    assert len(compression) == 3 and all(0 < float(r["held at start GiB"]) <= float(r["peak GiB"]) for r in compression)
    assert (tmp_path / "figures" / "pareto-results-wikitext2-test-2.png").is_file()
    headline = table_rows(page, "pipeline")  # dense, uniform for reference, the best cell of keep 0.6 by WikiText-2
    best = min(rows[1:], key=lambda row: float(row[wikitext]))
    expected = ["dense", best["allocator"]] if best["allocator"] == "uniform" else ["dense", "uniform", best["allocator"]]
    assert [r["pipeline"].split(" + ")[0] for r in headline] == expected
    assert headline[-1]["command"].startswith("`rankcut compress --model ") and "--keep 0.6" in headline[-1]["command"]
    if len(headline) == 3:
        assert headline[1]["pipeline"].endswith("(reference)") and not headline[2]["pipeline"].endswith("(reference)")
    written = readme.read_text()  # the README's block holds the same headline table
    assert table_rows(written, "pipeline") == headline and "stale table" not in written
    assert written.startswith("intro\n<!-- headline results -->\n") and written.endswith("<!-- /headline results -->\nafter\n")
    readme.write_text("no block here\n")
    with pytest.raises(SystemExit, match="no '<!-- headline results -->'"):
        results_script.main(["--results", str(results), "--out", str(out), "--readme", str(readme)])

    results_script.main(["--results", str(results), "--out", str(out)])  # 2 items per task: under the default 500
    assert all(row["zero-shot avg acc"] == "—" for row in table_rows(out.read_text(), "allocator"))


def test_matrix_recompresses_a_cell_whose_artifact_is_gone_only_if_it_gives_the_stored_plan(tiny_folder, tmp_path,
                                                                                            capsys):
    matrix = script("compress_matrix")
    results, artifacts = tmp_path / "results", tmp_path / "artifacts"
    setting = ["--model", str(tiny_folder), "--keeps", "0.6", "--calib", "wikitext2:validation", "--nsamples", "4",
               "--seqlen", "32", "--eval-seqlen", "32", "--results", str(results), "--artifacts", str(artifacts)]
    cell = "uniform-plain-cholesky-keep0.6-wikitext2"
    cell_path = results / f"{cell}.json"
    matrix.main(setting + ["--eval", "wikitext2:test:2"])
    first = json.loads(cell_path.read_text())

    stored = json.loads(cell_path.read_text())  # a plan the compressor will not give again
    module = next(iter(stored["report"]["plan"]["ranks"]))
    stored["report"]["plan"]["ranks"][module] = 1
    cell_path.write_text(json.dumps(stored))
    shutil.rmtree(artifacts / cell)
    matrix.main(setting + ["--eval", "wikitext2:test:2", "c4:validation:2"])
    assert "gave another rank plan" in capsys.readouterr().out
    assert json.loads(cell_path.read_text()) == stored and not (artifacts / cell).exists()
    assert not (artifacts / f"{cell}.work").exists()  # a fresh cell starts from scratch, timed whole

    cell_path.write_text(json.dumps(first))
    matrix.main(setting + ["--eval", "wikitext2:test:2", "c4:validation:2"])
    assert "compressing again" in capsys.readouterr().out
    row = json.loads(cell_path.read_text())
    assert row["perplexity"]["wikitext2:test:2"] == first["perplexity"]["wikitext2:test:2"]  # kept (timing too)
    assert row["report"] == first["report"] and math.isfinite(row["perplexity"]["c4:validation:2"]["perplexity"])
    assert (artifacts / cell / "config.json").is_file()  # saved: the next resume loads it


def test_time_cli_records_a_user_run(tiny_folder, tmp_path, capsys):
    """time_cli.py runs the rankcut command in fresh processes and keeps what the run measured."""
    out, artifact = tmp_path / "cli.json", tmp_path / "artifact"
    script("time_cli").main(["--out", str(out), "--artifact", str(artifact), "--eval", "wikitext2:test:2", "--",
                             "--model", str(tiny_folder), "--keep", "0.6", "--calib", "wikitext2",
                             "--calib-split", "validation", "--nsamples", "4", "--seqlen", "32"])
    record = json.loads(out.read_text())
    assert record["command"].startswith("rankcut compress --model ") and str(artifact) not in record["command"]
    assert record["wall_seconds"] > record["timings"]["calibrate + decompose"] > 0
    assert record["process_peak_rss_bytes"] >= record["memory"]["host_peak_bytes"] > 0
    assert 0 < record["measured"]["target_params"] <= record["measured"]["budget"]
    assert record["perplexity"]["windows"] == 2 and math.isfinite(record["perplexity"]["perplexity"])
    assert f"{record['perplexity']['perplexity']:.4f}" in capsys.readouterr().out
    assert record["perplexity"]["model"] == "artifact" and not list(tmp_path.glob("*.tmp.json"))
    assert record["environment"]["cpu"] == processor_name() and "reference" not in record


def test_time_cli_compares_the_streamed_command_with_a_cell_of_the_same_settings(tiny_folder, tmp_path, capsys):
    """The command streams the checkpoint; the matrix cell compressed the loaded model: same plan, same
    perplexity. A cell with another plan is reported as such, and scale.py tabulates both runs."""
    results, cells = tmp_path / "results", tmp_path / "cells"
    settings = ["--nsamples", "4", "--seqlen", "32"]
    script("compress_matrix").main(["--model", str(tiny_folder), "--keeps", "0.6", "--formats", "pivga",
                                    "--allocators", "zerosum", "--calib", "wikitext2:validation", "--eval-seqlen", "32",
                                    "--results", str(results), "--eval", "wikitext2:test:2", *settings])
    cell_path = results / "zerosum-pivga-cholesky-keep0.6-wikitext2.json"
    time_cli, command = script("time_cli"), ["--", "--model", str(tiny_folder), "--keep", "0.6", "--allocator", "zerosum",
                                             "--calib", "wikitext2", "--calib-split", "validation", "--closed-loop",
                                             "none", *settings]
    run = ["--artifact", str(tmp_path / "artifact"), "--eval", "wikitext2:test:2", "--cell", str(cell_path)]
    time_cli.main(["--out", str(cells / "same.json"), *run, *command])
    same = json.loads((cells / "same.json").read_text())["reference"]
    cell = json.loads(cell_path.read_text())
    assert same["same_plan"] and same["modules_with_another_rank"] == []
    assert same["perplexity"] == cell["perplexity"]["wikitext2:test:2"]["perplexity"]
    assert json.loads((cells / "same.json").read_text())["perplexity"]["perplexity"] == pytest.approx(same["perplexity"], rel=1e-5)

    module = next(iter(cell["report"]["plan"]["ranks"]))
    cell["report"]["plan"]["ranks"][module] = 1
    other = tmp_path / "other-cell.json"
    other.write_text(json.dumps(cell))
    time_cli.main(["--out", str(cells / "other.json"), *run[:-1], str(other), *command])
    assert json.loads((cells / "other.json").read_text())["reference"]["modules_with_another_rank"] == [module]
    with pytest.raises(SystemExit):  # nothing to compare the perplexity with
        time_cli.main(["--out", str(cells / "x.json"), *run[:3], "c4:validation:2", *run[4:], *command])
    assert "has no c4:validation:2 perplexity" in capsys.readouterr().err

    script("scale").render(cells, tmp_path / "page.md")
    rows = table_rows((tmp_path / "page.md").read_text(), "command")
    assert sorted(row["same plan as the cell"] for row in rows) == ["no: 1 modules differ", "yes"]
    assert all(row["cpu"] == "same" and float(row["others' CPU"]) >= 0 for row in rows)


def test_scale_benchmark_runs_a_tiny_suite_and_renders_it(tmp_path, monkeypatch):
    """benchmarks/scale.py end to end at a tiny shape on CPU: a synthetic checkpoint written shard by
    shard, a fresh process per cell, the peak read from the kernel, the estimator beside it, the page;
    and the equivalence checks that benchmarks/gpu_check.sh runs on CUDA, here on the CPU."""
    scale = script("scale")
    scale.measure("tiny", threads=1, results=tmp_path / "cells")
    cell = json.loads((tmp_path / "cells" / "tiny-2-uniform.json").read_text())
    assert cell["peak_rss_bytes"] > 0 and cell["predicted_host_bytes"] > 0 and cell["device"] == "cpu"
    assert cell["measured"]["target_params"] <= cell["measured"]["budget"] and cell["closed_loop"] == "none"
    looped = json.loads((tmp_path / "cells" / "tiny-2-uniform+compensate.json").read_text())
    assert (looped["closed_loop"], looped["refine_steps"]) == ("compensate", 4)
    assert looped["measured"]["target_params"] == cell["measured"]["target_params"]  # the same plan's budget
    scale.render(tmp_path / "cells", tmp_path / "page.md")
    rows = table_rows((tmp_path / "page.md").read_text(), "suite")
    assert rows[0]["allocator"] == "uniform" and rows[0]["blocks"] == "2"
    assert rows[1]["allocator"] == "uniform+compensate"
    assert cell["cpu"] == processor_name() and rows[0]["cpu"] == "A" and f"A: {cell['cpu']}." in (tmp_path / "page.md").read_text()
    assert cell["others_cpu_cores"] >= 0 and rows[0]["others' CPU"] == f"{cell['others_cpu_cores']:.2f}"
    del cell["others_cpu_cores"]  # a cell recorded before it was measured shows the load average it recorded
    (tmp_path / "cells" / "tiny-2-uniform.json").write_text(json.dumps({**cell, "load_before": 1.46}))
    scale.render(tmp_path / "cells", tmp_path / "page.md")
    assert table_rows((tmp_path / "page.md").read_text(), "suite")[0]["others' CPU"] == "load 1.5 before"
    scale.check_equivalence("cpu")
    scale.check_launched("cpu")  # the NCCL check of gpu_check.sh, with gloo
    gpu_check = (BENCHMARKS / "gpu_check.sh").read_text()
    assert gpu_check.count("--check-cuda-equivalence") == 1 and gpu_check.count("--check-nccl") == 1


def test_closed_loop_cells_get_their_own_table(tiny_folder, tmp_path):
    matrix, results_script = script("compress_matrix"), script("make_results")
    results = tmp_path / "results"
    setting = ["--model", str(tiny_folder), "--keeps", "0.6", "--formats", "pivga", "--calib", "wikitext2:validation",
               "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--results", str(results),
               "--eval", "wikitext2:test:2"]
    matrix.main(setting)
    matrix.main(setting + ["--closed-loops", "sequential", "compensate", "--compensations", "1", "0.5",
                           "--refine-steps", "0", "2"])
    names = sorted(path.stem for path in results.glob("uniform-*.json"))
    stem = "uniform-pivga-cholesky-keep0.6-wikitext2"
    assert names == sorted([stem, f"{stem}-sequential", f"{stem}-compensate", f"{stem}-compensate0.5",
                            f"{stem}-compensate-refine2", f"{stem}-compensate0.5-refine2"])
    out = tmp_path / "RESULTS.md"
    results_script.main(["--results", str(results), "--out", str(out)])
    page = out.read_text()
    rows = table_rows(page, "closed loop")
    assert [row["closed loop"] for row in rows] == ["none", "sequential", "compensate", "compensate + refine 2",
                                                    "compensate 0.5", "compensate 0.5 + refine 2"]
    assert all(row["refined blocks kept"].endswith(" / 3") for row in rows if "refine" in row["closed loop"])  # 3 blocks
    assert "### Ablation" not in page  # closed-loop cells are not ablations of the open-loop cell
    cell = json.loads((results / f"{stem}-compensate0.5-refine2.json").read_text())
    assert results_script.reproduce_command(cell).endswith("--closed-loop compensate --compensation 0.5 --anchor 0 "
                                                           "--refine-steps 2 --refine-lr 0.0001")
    # the weight correction's share of a step names its cell, its row and its command
    # (the correction is today's default closed loop: its command names only what differs from the defaults,
    # and an open-loop cell's says so)
    matrix.main(setting + ["--closed-loops", "correct", "--correction-rounds", "2", "--correction-steps", "0.25"])
    results_script.main(["--results", str(results), "--out", str(out)])
    assert "correct 2 rounds step 0.25" in [row["closed loop"] for row in table_rows(out.read_text(), "closed loop")]
    cell = json.loads((results / f"{stem}-correct2-step0.25.json").read_text())
    assert results_script.reproduce_command(cell).endswith("--seqlen 32 --correction-rounds 2 --correction-step 0.25")
    open_loop = json.loads((results / f"{stem}.json").read_text())
    assert results_script.reproduce_command(open_loop).endswith("--seqlen 32 --closed-loop none")
    # refinement after the open loop and after the correction: rows of the same table, named after their fit
    matrix.main(setting + ["--closed-loops", "none", "sequential", "--refine-steps", "2"])
    matrix.main(setting + ["--closed-loops", "correct", "--correction-steps", "0.5", "--refine-steps", "2"])
    assert not (results / f"{stem}-sequential-refine2.json").exists()  # the sequential pass carries no dense outputs
    results_script.main(["--results", str(results), "--out", str(out)])
    modes = [row["closed loop"] for row in table_rows(out.read_text(), "closed loop")]
    assert "none + refine 2" in modes and "correct step 0.5 + refine 2" in modes
    refined = json.loads((results / f"{stem}-refine2.json").read_text())
    assert results_script.allocator_tag(refined) == ""
    assert results_script.reproduce_command(refined).endswith("--closed-loop none --refine-steps 2 --refine-lr 0.0001")
    corrected = json.loads((results / f"{stem}-correct-step0.5-refine2.json").read_text())
    assert results_script.reproduce_command(corrected).endswith("--seqlen 32 --refine-steps 2 --refine-lr 0.0001")
    # the correction's window count and the refinement's lr name their cell (a tag's own -lr stays the tag),
    # row and command
    matrix.main(setting + ["--closed-loops", "correct", "--correction-steps", "0.5", "--correction-windows", "2",
                           "--refine-steps", "2", "--refine-lr", "0.001", "--tag=-epoch1-lr0.15"])
    windowed = json.loads((results / f"{stem}-correct-step0.5-windows2-refine2-lr0.001-epoch1-lr0.15.json").read_text())
    assert windowed["report"]["config"]["correction_windows"] == 2
    assert results_script.allocator_tag(windowed) == "-epoch1-lr0.15"
    assert results_script.reproduce_command(windowed).endswith("--seqlen 32 --refine-steps 2 --refine-lr 0.001 "
                                                               "--correction-windows 2")
    results_script.main(["--results", str(results), "--out", str(out)])
    heading = "### Closed loop: uniform `-epoch1-lr0.15`, pivga, cholesky, keep 0.6, wikitext2 calibration"
    assert [row["closed loop"] for row in table_rows(out.read_text(), "closed loop", heading)] == [
        "correct step 0.5 2 windows + refine 2 lr 0.001"]

    # A tagged allocator's closed-loop cell is compared with the open-loop cell of the same tag, not the default.
    matrix.main(setting + ["--tag=-v2", "--allocator-options", '{"uniform": {}}'])
    matrix.main(setting + ["--tag=-v2", "--closed-loops", "compensate"])
    tagged = json.loads((results / f"{stem}-v2.json").read_text())
    next(iter(tagged["perplexity"].values()))["perplexity"] = 1234.5  # tells the open-loop cells apart
    (results / f"{stem}-v2.json").write_text(json.dumps(tagged))
    results_script.main(["--results", str(results), "--out", str(out)])
    page = out.read_text()
    title = "### Closed loop: uniform `-v2`, pivga, cholesky, keep 0.6, wikitext2 calibration"
    rows = table_rows(page, "closed loop", after=title)
    assert [row["closed loop"] for row in rows] == ["none", "compensate"]
    assert rows[0]["WikiText-2 test ppl, 2 windows"] == "1234.50"
    assert results_script.allocator_tag(json.loads((results / f"{stem}-compensate-v2.json").read_text())) == "-v2"


def test_speed_ratios_come_only_from_interleaved_rounds():
    make_results = script("make_results")
    once = {"speed_ratio": {"prefill_speedup": 1.36}}  # a cell measured before the rounds: noise on 2 cores
    rounds = {"speed_ratio": {"prefill_speedup": 1.1, "prefill_speedup_range": [1.05, 1.2]}}
    level = {"speed_ratio": {"prefill_speedup": 1.02, "prefill_speedup_range": [0.97, 1.1]}}
    assert make_results.speed_text(once, "prefill_speedup") == make_results.MISSING
    assert make_results.speed_text(rounds, "prefill_speedup") == "1.10 (1.05–1.20)"
    assert make_results.speed_text(level, "prefill_speedup") == "no measurable difference (0.97–1.10)"


def test_zero_shot_marks_each_reference_within_twice_the_combined_standard_error():
    accuracy_text = script("make_results").accuracy_text
    dense, uniform = (0.40, 0.01), (0.35, 0.01)
    references = [("dense", dense), ("uniform", uniform)]
    # twice the combined standard error: 2·hypot(0.01, 0.01) ≈ 0.028
    assert accuracy_text((0.38, 0.01), references) == "0.3800 ± 0.0100 (≈ dense)"  # 0.02 from dense, 0.03 from uniform
    assert accuracy_text((0.355, 0.01), references) == "0.3550 ± 0.0100 (≈ uniform)"
    assert accuracy_text((0.375, 0.01), references) == "0.3750 ± 0.0100 (≈ dense, ≈ uniform)"
    assert accuracy_text((0.30, 0.01), [("dense", dense), ("uniform", None)]) == "0.3000 ± 0.0100"


def test_zero_shot_over_other_tasks_is_flagged_and_not_compared():
    results_script = script("make_results")
    eight, seven = tuple(f"task{i}" for i in range(8)), tuple(f"task{i}" for i in range(7))
    dense, partial = (0.40, 0.01, eight, 500), (0.39, 0.01, seven, 500)
    common = results_script.most_common_zeroshot([dense, (0.38, 0.01, eight, 500), partial, None])
    assert common == (eight, 500)
    # 0.01 from dense would be "≈ dense" over the same tasks; over seven of them it is no comparison at all
    text = results_script.accuracy_text
    assert text(partial, [("dense", dense)], common) == "0.3900 ± 0.0100 (7 tasks, first 500 items per task)"
    assert text(dense[:2] + (eight, None), [], common) == "0.4000 ± 0.0100 (8 tasks, all items)"


def test_headline_adds_the_calibration_a_cached_cell_skipped():
    calibration_seconds = script("make_results").calibration_seconds

    def cell(seconds: float, whitening: str = "cholesky", dataset: str = "wikitext2") -> dict:
        config = {"whitening": whitening, "calibration": {"dataset": dataset, "nsamples": 256, "seqlen": 512}}
        return {"report": {"config": config, "timings": {"calibrate + decompose": seconds}}}

    computed, slower, cached = cell(567.0), cell(1551.0), cell(2.4)
    others = [cell(570.0, dataset="c4"), cell(34.0, whitening="none")]
    cells = [computed, slower, cached, *others]
    assert calibration_seconds(cached, cells) == 567.0  # the fastest cell that computed spectra of its setting
    assert calibration_seconds(computed, cells) is None  # it calibrated itself
    assert calibration_seconds(cached, [cached, *others]) is None  # no cell of its setting computed them


def test_compress_seconds_are_marked_where_other_processes_shared_the_cpu():
    results_script = script("make_results")
    assert results_script.compress_seconds_text({"compress_seconds": 12.4}) == "12"  # recorded before it was measured
    assert results_script.compress_seconds_text({"compress_seconds": 12.4, "compress_others_cpu_cores": 0.05}) == "12"
    assert results_script.compress_seconds_text({"compress_seconds": 12.4, "compress_others_cpu_cores": 0.6}) == "12§"
