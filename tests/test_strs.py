import json
import math

import pytest
import torch

from conftest import ARCHS, VOCAB, calibration_ids, language_model_loss, tiny_model
from test_spectral import spectra_of
from conftest import assert_budget_met
from rankcut import CompressionConfig, compress
from rankcut.allocation import AllocationContext, create_allocator
from rankcut.allocation.spectral import spectral_view
from rankcut.allocation.strs import StrsConfig, _write_cache, candidate_ranks, sensitivity_table, threshold_ranks
from rankcut.evaluation.perplexity import window_nll
from rankcut.sweep import ModelStream
from rankcut.errors import ConfigError, RankcutError
from rankcut.plan import DENSE, Budget

STATES = 64  # the Markov chain below uses the first 64 token ids


def markov_ids(rows: int, length: int, seed: int) -> torch.Tensor:
    """Token chains that follow a fixed permutation 90% of the time: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(STATES, generator=torch.Generator().manual_seed(123))
    ids = torch.empty(rows, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, STATES, (rows,), generator=generator)
    for t in range(1, length):
        noise = torch.rand(rows, generator=generator) < 0.1
        ids[:, t] = torch.where(noise, torch.randint(0, STATES, (rows,), generator=generator), successor[ids[:, t - 1]])
    return ids


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained briefly on the chains (a random model's perplexity barely depends on
    truncation, so it cannot show a sensitivity trend), its spectra and calibration ids."""
    model = tiny_model()
    train = markov_ids(64, 32, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = train[torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(step))]
        loss = language_model_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ids = markov_ids(16, 32, 2)
    targets, spectra = spectra_of(model, ids)
    assert VOCAB > STATES
    return model, targets, spectra, ids


def context_for(trained, keep_ratio=0.6, factor_format="plain", seed=0, cache_dir=None):
    model, targets, spectra, ids = trained
    budget = Budget({t.name: t.shape for t in targets}, keep_ratio, factor_format)
    return AllocationContext(budget, targets, spectra, model, ids, seed=seed, show_progress=False, cache_dir=cache_dir)


OPTIONS = {"windows": 4, "tokens": 24, "keep_ratios": [0.1, 0.3, 0.5, 0.7, 0.9]}


def brute_force_perplexity(model, targets, spectra, ids, name=None, rank=None) -> float:
    """The whole model's perplexity on ``ids``, with module ``name`` truncated to ``rank`` (None: dense)."""
    with torch.no_grad(), spectral_view(model, targets, spectra) as layers:
        if name is not None:
            layers[name].gate = torch.ones(rank)
        nll = float(window_nll(model, ids).sum())
    return math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1)))


def test_full_rank_equals_dense_and_each_probe_is_the_truncated_model(trained, tmp_path):
    model, targets, spectra, ids = trained
    stream = ModelStream(model, targets, store_dir=tmp_path / "store")
    dense, full = sensitivity_table(stream, spectra, ids[:4], 3, {t.name: [min(t.shape)] for t in targets})
    assert dense == pytest.approx(brute_force_perplexity(model, targets, spectra, ids[:4]), rel=1e-5)
    for target in targets:
        assert full[target.name][min(target.shape)] == pytest.approx(dense, rel=1e-5)
    some = {t.name: [2, 7] for t in targets[::5]}
    _, table = sensitivity_table(stream, spectra, ids[:4], 3, some)
    assert table.keys() == some.keys()
    for name in some:
        for rank in (2, 7):
            assert table[name][rank] == pytest.approx(brute_force_perplexity(model, targets, spectra, ids[:4], name, rank),
                                                      rel=1e-5)
            assert table[name][rank] != pytest.approx(dense, rel=1e-6)  # truncation is seen
    assert not list((tmp_path / "store").iterdir())  # every probe's activations were read back and deleted


def test_sensitivity_trend_on_a_trained_model(trained):
    """Not guaranteed per module (truncation can lower the loss by chance), so test the trend: the
    mean log-perplexity over modules falls from the smallest to the largest keep ratio, and the most
    sensitive module's curve falls monotonically."""
    model, targets, spectra, ids = trained
    context = context_for(trained)
    candidates = candidate_ranks(context.budget, OPTIONS["keep_ratios"])
    dense, table = sensitivity_table(ModelStream(model, targets), spectra, ids[:4], 2,
                                     {name: sorted(c.values()) for name, c in candidates.items()})
    curves = torch.tensor([[math.log(p) for _, p in sorted(table[t.name].items())] for t in targets])
    mean = curves.mean(dim=0)
    assert mean[0] > mean[-1] + 0.02
    worst = curves[curves[:, 0].argmax()]
    assert (worst.diff() <= 0).all()
    assert worst[0] > math.log(dense) + 0.1


def test_threshold_search_on_a_worked_table():
    budget = Budget({"a": (10, 10), "b": (10, 10)}, 0.5)  # target 100; rank k costs 20k, dense 100
    curves = {"a": [(1, 9.0), (2, 5.0), (4, 2.0)], "b": [(1, 3.0), (2, 2.5), (4, 1.5)]}
    ranks, threshold = threshold_ranks(budget, curves)
    # τ=1.5: a dense, b 4 -> 180; τ=2: a 4, b 4 -> 160; τ=2.5: a 4, b 2 -> 120; τ=3: a 4, b 1 -> 100 fits.
    assert (ranks, threshold) == ({"a": 4, "b": 1}, 3.0)
    assert threshold_ranks(Budget({"a": (10, 10), "b": (10, 10)}, 1.0), curves) == ({"a": DENSE, "b": DENSE}, None)
    with pytest.raises(ConfigError, match="smaller keep_ratios"):
        threshold_ranks(Budget({"a": (10, 10), "b": (10, 10)}, 0.1), curves)


@pytest.mark.parametrize("factor_format", ["plain", "pivga"])
def test_allocation_meets_the_budget_exactly(trained, factor_format):
    plan = create_allocator("strs", OPTIONS).allocate(context_for(trained, 0.55, factor_format))
    assert_budget_met(plan.ranks, plan.budget)
    info = plan.info
    assert info["evaluations"] > 0 and not info["cache_hit"] and info["cache_file"] is None
    assert info["settings"]["windows_used"] == 4 and info["settings"]["tokens_used"] == 24
    assert set(info["sensitivity"]) == set(plan.ranks)


def test_cache_is_written_and_reused(trained, tmp_path):
    first = create_allocator("strs", OPTIONS).allocate(context_for(trained, cache_dir=tmp_path))
    files = list(tmp_path.glob("strs-*.json"))
    assert len(files) == 1 and first.info["cache_file"] == files[0].name
    assert first.info["evaluations"] == sum(len(set(c.values())) for c in
                                            candidate_ranks(first.budget, OPTIONS["keep_ratios"]).values())
    second = create_allocator("strs", OPTIONS).allocate(context_for(trained, cache_dir=tmp_path))
    assert second.info["evaluations"] == 0 and second.info["cache_hit"]
    assert second.ranks == first.ranks
    assert second.info["sensitivity"] == first.info["sensitivity"]
    # a different budget reuses the table too: it does not depend on the keep ratio
    assert create_allocator("strs", OPTIONS).allocate(context_for(trained, 0.4, cache_dir=tmp_path)).info["cache_hit"]
    # anything the table depends on misses: candidates, calibration windows, weights
    assert not create_allocator("strs", {**OPTIONS, "keep_ratios": [0.2, 0.6]}).allocate(
        context_for(trained, cache_dir=tmp_path)).info["cache_hit"]
    assert not create_allocator("strs", OPTIONS).allocate(context_for(trained, seed=1, cache_dir=tmp_path)).info["cache_hit"]
    model = trained[0]
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-3
    try:
        assert not create_allocator("strs", OPTIONS).allocate(context_for(trained, cache_dir=tmp_path)).info["cache_hit"]
    finally:
        with torch.no_grad():
            model.model.layers[2].mlp.down_proj.weight[0, 0] -= 1e-3
    # use_cache=false recomputes, and a corrupt file is ignored
    assert not create_allocator("strs", {**OPTIONS, "use_cache": False}).allocate(
        context_for(trained, cache_dir=tmp_path)).info["cache_hit"]
    files[0].write_text("{not json")
    assert not create_allocator("strs", OPTIONS).allocate(context_for(trained, cache_dir=tmp_path)).info["cache_hit"]
    assert json.loads(files[0].read_text())["key"]  # rewritten


def test_cache_write_is_atomic_and_failures_are_clear(tmp_path):
    path = tmp_path / "cache" / "strs-key.json"
    _write_cache(path, {"key": "k"})  # creates the folder
    assert json.loads(path.read_text()) == {"key": "k"} and [p.name for p in path.parent.iterdir()] == [path.name]
    blocked = tmp_path / "cache" / "strs-dir.json"
    blocked.mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(RankcutError, match=r"could not write the strs sensitivity cache .*strs-dir\.json .*check the "
                                           "folder or point RANKCUT_CACHE to another folder"):
        _write_cache(blocked, {"key": "k"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["strs-dir.json", "strs-key.json"]  # no temporary left


def test_same_seed_same_plan(trained):
    options = {**OPTIONS, "windows": 3}
    plans = [create_allocator("strs", options).allocate(context_for(trained, seed=seed)) for seed in (5, 5)]
    assert plans[0].ranks == plans[1].ranks and plans[0].info["sensitivity"] == plans[1].info["sensitivity"]


def test_compress_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path))
    ids = calibration_ids(8, 24, seed=4)
    config = CompressionConfig(keep_ratio=0.6, allocator="strs", allocator_options={"keep_ratios": "0.3,0.5,0.7",
                                                                                    "windows": "2", "tokens": "16"})
    compressed, report = compress(tiny_model(), config, calibration=ids, show_progress=False)
    assert report.measured["target_params"] == report.plan.total_cost <= report.measured["budget"]
    assert list(report.plan.allocator_config["keep_ratios"]) == [0.3, 0.5, 0.7]
    assert list((tmp_path / "allocators").glob("strs-*.json"))
    with torch.no_grad():
        assert torch.isfinite(compressed(ids[:2]).logits).all()


def test_defaults():
    config = StrsConfig()
    assert config.keep_ratios == (0.2, 0.4, 0.6, 0.8, 0.9) and config.windows == 2 and config.tokens == 256
    assert StrsConfig.from_dict({"keep_ratios": "0.3,0.5"}).keep_ratios == (0.3, 0.5)
    assert StrsConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("options", [{"keep_ratios": []}, {"keep_ratios": [0.5, 1.0]}, {"keep_ratios": [0.0, 0.5]},
                                     {"keep_ratios": [0.5, 0.5]}, {"keep_ratios": "0.5,half"}, {"keep_ratios": 0.5}, {"keep_ratios": [True]}, {"windows": 0},
                                     {"tokens": 1}, {"batch_size": 0}, {"ratio": 0.5}])
def test_bad_options_raise(options):
    with pytest.raises(ConfigError):
        create_allocator("strs", options)


def test_needs_model_and_data():
    with pytest.raises(ConfigError, match="model and calibration"):
        create_allocator("strs").allocate(AllocationContext(Budget({"a": (6, 6)}, 0.5), [], {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_probes_are_the_truncated_model_on_every_architecture(arch):
    """Probes start at their block from the dense inputs on any decoder block (masks, rotary, Gemma's
    layer types), and the model's own head scores them."""
    ids = calibration_ids(4, 16, seed=5)
    model = tiny_model(arch)
    targets, spectra = spectra_of(model, ids)
    chosen = [t for t in targets if t.block == targets[-1].block][:2] + [targets[1]]
    dense, table = sensitivity_table(ModelStream(model, targets), spectra, ids, 2, {t.name: [3] for t in chosen})
    assert dense == pytest.approx(brute_force_perplexity(model, targets, spectra, ids), rel=1e-5)
    for target in chosen:
        assert table[target.name][3] == pytest.approx(brute_force_perplexity(model, targets, spectra, ids, target.name, 3),
                                                      rel=1e-5)
