from rankcut.plan import RankPlan
from rankcut.plots import plot_pareto, plot_ranks, plot_spectra


def test_plots_write_png(tmp_path):
    shapes = {f"model.layers.{i}.self_attn.{k}": (16, 16) for i in range(3) for k in ("q_proj", "k_proj")}
    plan = RankPlan({name: 2 + i for i, name in enumerate(shapes)}, shapes, 0.5, allocator="energy")
    for path in (plot_ranks(plan, tmp_path / "r.png"), plot_ranks({"a": plan, "b": plan}, tmp_path / "r2.png"),
                 plot_pareto([("uniform", 0.8, 90.0), ("uniform", 0.6, 260.0)], tmp_path / "p.png", dense=30.0),
                 plot_spectra({f"m{i}": ([3.0, 2.0, 1.0], [5.0, 1.0, 0.1]) for i in range(5)}, tmp_path / "s.png", "t")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
