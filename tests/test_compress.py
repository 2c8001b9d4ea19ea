import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankcut
from conftest import ARCHS, calibration_ids, shard_holding, tiny_model
from rankcut import CompressionConfig, compress
from rankcut.errors import ArtifactError, ConfigError, FactorizationError
from rankcut.layers import LowRankLinear, PivGaLinear
from rankcut.memory import current_rss, touch_fresh_pages
from rankcut.plan import DENSE


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("allocator, factor_format", [("uniform", "plain"), ("energy", "plain"), ("energy", "pivga")])
def test_end_to_end_meets_budget(arch, allocator, factor_format):
    model = tiny_model(arch)
    dense_targets = sum(t.out_features * t.in_features for t in rankcut.find_targets(model))
    model, report = compress(model, CompressionConfig(keep_ratio=0.6, allocator=allocator, factor_format=factor_format),
                             calibration=calibration_ids(), show_progress=False)
    measured = report.measured
    assert measured["target_params_dense"] == dense_targets
    assert measured["budget"] == int(0.6 * dense_targets)
    counted = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and not n.endswith("bias")
                  and "norm" not in n)  # float parameters only: PivGa's index buffers are not parameters
    assert counted == measured["target_params"] <= measured["budget"]
    assert measured["budget_slack"] < 0.02  # tiny shapes: one rank step is ~1% of this budget
    expected_layer = LowRankLinear if factor_format == "plain" else PivGaLinear
    assert any(isinstance(m, expected_layer) for m in model.modules())
    assert torch.isfinite(logits(model, calibration_ids(2))).all()
    assert {d["path"] for d in report.diagnostics.values()} <= {"cholesky", "eigh"}


def test_peak_memory_is_that_of_the_call_not_of_the_process():
    touch_fresh_pages(400_000_000)  # a process peak before the call, which is not the call's
    before = current_rss()
    _, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.7), calibration=calibration_ids(),
                         show_progress=False)
    assert report.memory["host_method"] in {"VmHWM reset via /proc/self/clear_refs", "RSS sampled every 1 ms"}
    assert before <= report.peak_memory_bytes < before + 200_000_000
    assert abs(report.memory["host_start_bytes"] - before) < 20_000_000
    if not torch.cuda.is_available():  # the host figures alone make the peak: the report says what was held
        assert "held when the call began" in dict(report.summary_rows())["peak memory"]
    assert report.to_dict()["memory"] == report.memory


def test_output_dir_gets_the_whitening_spectra_plot(tmp_path, monkeypatch):
    import rankcut.plots

    drawn = {}
    original = rankcut.plots.plot_spectra
    monkeypatch.setattr(rankcut.plots, "plot_spectra", lambda curves, path, title: drawn.update(curves) or
                        original(curves, path, title))
    model = tiny_model()
    dense = {name: module.weight.detach().clone() for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)}
    compress(model, CompressionConfig(keep_ratio=0.7), calibration=calibration_ids(), show_progress=False,
             output_dir=tmp_path)
    assert (tmp_path / "spectra_whitening.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    middle = len(model.model.layers) // 2
    assert set(drawn) == {name.split(f".{middle}.")[1] for name in dense if f"layers.{middle}." in name}
    plain, whitened = drawn["self_attn.q_proj"]
    expected = torch.linalg.svdvals(dense[f"model.layers.{middle}.self_attn.q_proj"].double())
    assert plain == pytest.approx(expected.tolist(), rel=1e-9)
    assert whitened == sorted(whitened, reverse=True) and len(whitened) == len(plain)

    compress(tiny_model(), CompressionConfig(keep_ratio=0.7, whitening="none", allocator="uniform"), show_progress=False,
             output_dir=tmp_path / "plain")
    assert not (tmp_path / "plain" / "spectra_whitening.png").exists()  # nothing to compare without whitening


def test_shared_inputs_are_detected():
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.7), calibration=calibration_ids(),
                             show_progress=False)
    shared = report.diagnostics["model.layers.0.self_attn.q_proj"]["shared_input"]
    assert [name.rsplit(".", 1)[1] for name in shared] == ["q_proj", "k_proj", "v_proj"]
    gate = report.diagnostics["model.layers.1.mlp.gate_proj"]["shared_input"]
    assert [name.rsplit(".", 1)[1] for name in gate] == ["gate_proj", "up_proj"]
    assert report.diagnostics["model.layers.1.mlp.down_proj"]["shared_input"] == ["model.layers.1.mlp.down_proj"]


def test_keep_one_keeps_everything_dense():
    model = tiny_model()
    reference = logits(model, calibration_ids(2))
    model, report = compress(model, CompressionConfig(keep_ratio=1.0), calibration=calibration_ids(), show_progress=False)
    assert set(report.plan.ranks.values()) == {DENSE}
    assert report.measured["target_params"] == report.measured["target_params_dense"]
    assert torch.equal(logits(model, calibration_ids(2)), reference)


def test_whitening_beats_plain_svd_on_calibration_loss():
    ids = calibration_ids(16, 32)
    reference = logits(tiny_model(), ids)
    errors = {}
    for whitening in ("none", "cholesky"):
        model, _ = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, whitening=whitening), calibration=ids,
                            show_progress=False)
        errors[whitening] = float((logits(model, ids) - reference).square().mean())
    assert errors["cholesky"] < errors["none"]


def test_sequential_differs_from_open_loop_and_meets_budget():
    ids = calibration_ids()
    open_loop, _ = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, allocator="uniform"), calibration=ids,
                            show_progress=False)
    closed, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, allocator="uniform", closed_loop="sequential"),
                              calibration=ids, show_progress=False)
    assert report.measured["target_params"] <= report.measured["budget"]
    assert "calibrate + decompose" not in report.timings  # uniform plans from shapes; one pass
    assert not torch.equal(logits(open_loop, ids[:2]), logits(closed, ids[:2]))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_save_and_load_give_identical_logits(arch, tmp_path, word_tokenizer):
    model, report = compress(tiny_model(arch), CompressionConfig(keep_ratio=0.6, allocator="energy"),
                             calibration=calibration_ids(), show_progress=False)
    ids = calibration_ids(2, 16, seed=5)
    expected = logits(model, ids)
    out = rankcut.save(model, word_tokenizer, tmp_path / "art", report, base_model="tiny")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "rankcut" and config["plan"]["allocator"] == "energy"
    assert config["settings"]["keep_ratio"] == 0.6 and config["diagnostics"]
    loaded, tokenizer = rankcut.load(out, device="cpu")
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-5
    assert tokenizer("the of").input_ids == word_tokenizer("the of").input_ids
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert (logits(stock, ids) - expected).abs().max() <= 1e-5
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def test_artifact_is_atomic_and_tamper_evident(tmp_path):
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6), calibration=calibration_ids(),
                             show_progress=False)
    out = rankcut.save(model, None, tmp_path / "art", report)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no partial folder left behind
    with pytest.raises(ArtifactError, match="already exists"):
        rankcut.save(model, None, tmp_path / "art", report)
    weights = shard_holding(out)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or altered"):
        rankcut.load(out)
    weights.write_bytes(data)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["rank"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="truncated or altered"):
        rankcut.load(out)


def test_stock_from_pretrained_refuses_missing_factors(tmp_path):
    """transformers would fill a missing tensor with uninitialized memory and only warn."""
    from safetensors.torch import load_file, save_file

    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6), calibration=calibration_ids(),
                             show_progress=False)
    out = rankcut.save(model, None, tmp_path / "art", report)
    AutoModelForCausalLM.from_pretrained(out)  # complete: loads
    shard = shard_holding(out, ".mlp.up_proj.")
    weights = load_file(shard)
    dropped = next(key for key in weights if ".mlp.up_proj." in key)
    del weights[dropped]
    save_file(weights, shard, metadata={"format": "pt"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match=f"lack 1 factor tensor.*{dropped}"):
        AutoModelForCausalLM.from_pretrained(out)


def test_newer_format_version_is_refused(tmp_path):
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6), calibration=calibration_ids(),
                             show_progress=False)
    out = rankcut.save(model, None, tmp_path / "art", report)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="newer than this rankcut supports"):
        rankcut.load(out, verify=False)


def test_bad_configs_fail_before_work():
    with pytest.raises(ConfigError, match="keep_ratio"):
        CompressionConfig(keep_ratio=1.2)
    with pytest.raises(ConfigError, match="unknown allocator 'magic'.*uniform"):
        CompressionConfig(allocator="magic")
    with pytest.raises(ConfigError, match="unknown option"):
        CompressionConfig(whitening_options={"nope": 1})
    with pytest.raises(ConfigError, match="unknown compression setting"):
        CompressionConfig.from_dict({"keep": 0.5})
    with pytest.raises(ConfigError, match="tokenizer"):
        compress(tiny_model(), CompressionConfig())


def test_nan_weight_is_an_error_naming_the_module():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN") as error:
        compress(model, CompressionConfig(keep_ratio=0.5, whitening="none"), calibration=calibration_ids(),
                 show_progress=False)
    assert isinstance(error.value, FactorizationError) and "model.layers.2.self_attn.o_proj" in str(error.value)


def test_pivga_plans_buy_more_rank_and_reload(tmp_path):
    ids = calibration_ids()
    plain, plain_report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6, allocator="uniform", factor_format="plain"),
                                   calibration=ids, show_progress=False)
    pivga, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6, allocator="uniform", factor_format="pivga"),
                             calibration=ids, show_progress=False)
    assert report.measured["target_params"] <= report.measured["budget"] == plain_report.measured["budget"]
    name = "model.layers.0.self_attn.q_proj"
    assert report.plan.ranks[name] > plain_report.plan.ranks[name]
    assert any(type(m).__name__ == "PivGaLinear" for m in pivga.modules())
    out = rankcut.save(pivga, None, tmp_path / "piv", report)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 2 and config["modules"][name]["type"] == "pivga"
    loaded, _ = rankcut.load(out, device="cpu")
    assert (logits(loaded, ids[:2]) - logits(pivga, ids[:2])).abs().max() <= 1e-5


def test_converting_plain_factors_to_pivga_is_lossless():
    from rankcut.layers import convert_to_pivga

    ids = calibration_ids()
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, factor_format="plain"), calibration=ids,
                             show_progress=False)
    before = logits(model, ids[:2])
    plain_params = sum(p.numel() for p in model.parameters())
    convert_to_pivga(model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    ranks = [r for r in report.plan.ranks.values() if r != DENSE]
    assert plain_params - sum(p.numel() for p in model.parameters()) == sum(r * r for r in ranks)
    assert (logits(model, ids[:2]) - before).abs().max() <= 1e-4 * before.abs().max()


def test_format_version_1_artifacts_still_load(tmp_path):
    model, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.6), calibration=calibration_ids(),
                             show_progress=False)
    out = rankcut.save(model, None, tmp_path / "v1", report)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1  # what rankcut wrote before PivGa layers existed
    (out / "config.json").write_text(json.dumps(config))
    loaded, _ = rankcut.load(out, verify=False)
    ids = calibration_ids(2)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_spectra_cache_is_reused_across_keep_ratios(tmp_path, monkeypatch):
    import importlib

    pipeline = importlib.import_module("rankcut.compress")  # the module, not the function rankcut.compress
    ids = calibration_ids()
    cache = tmp_path / "spectra"
    compress(tiny_model(), CompressionConfig(keep_ratio=0.8), calibration=ids, show_progress=False, spectra_cache=cache)
    expected, _ = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, factor_format="pivga", closed_loop="none"), calibration=ids,
                           show_progress=False)

    def no_decomposition(*args, **kwargs):
        raise AssertionError("spectra should come from the cache")

    monkeypatch.setattr(pipeline, "whitened_svd", no_decomposition)  # (the correction decomposes again: off)
    cached, report = compress(tiny_model(), CompressionConfig(keep_ratio=0.5, factor_format="pivga", closed_loop="none"), calibration=ids,
                              show_progress=False, spectra_cache=cache)
    assert torch.equal(logits(cached, ids[:2]), logits(expected, ids[:2]))
    assert report.diagnostics  # whitening diagnostics come back from the cache too
    with pytest.raises(AssertionError, match="from the cache"):  # other calibration data: another key
        compress(tiny_model(), CompressionConfig(keep_ratio=0.5), calibration=calibration_ids(seed=9),
                 show_progress=False, spectra_cache=cache)
