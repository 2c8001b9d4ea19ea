import pytest
import torch

from conftest import ARCHS, calibration_ids, tiny_model
from rankcut.calibration import BlockRun, BlockStream, InputStatistics, _gram_upper, _symmetric
from rankcut.targets import find_targets


def inputs_of_every_target(model, targets, ids) -> dict[str, torch.Tensor]:
    """Each target's inputs over a plain forward of the whole model, tokens x n, float64."""
    seen: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    handles = [model.get_submodule(t.name).register_forward_hook(
        lambda _m, inputs, _o, name=t.name: seen[name].append(inputs[0].reshape(-1, inputs[0].shape[-1]).double()))
        for t in targets]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_statistics_are_those_of_a_full_forward(arch):
    """Block by block, in uneven batches, the Gram is XᵀX / tokens of the inputs a full forward feeds
    each module (the open loop sees the dense model), and the mean |x| matches too."""
    model = tiny_model(arch)
    targets = find_targets(model)
    ids = calibration_ids(n=7, length=16)
    expected = inputs_of_every_target(model, targets, ids)
    statistics: dict[str, InputStatistics] = {}

    def keep(run: BlockRun) -> None:
        statistics.update(run.statistics)

    BlockStream(model, targets, ids, batch_size=3).run(keep)
    assert set(statistics) == set(expected)
    for name, x in expected.items():
        stats = statistics[name]
        assert stats.tokens == x.shape[0] == ids.numel()
        assert stats.gram.dtype == torch.float64
        assert torch.equal(stats.gram, stats.gram.T)
        torch.testing.assert_close(stats.gram, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6 * float(x.square().mean()))
        torch.testing.assert_close(stats.abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n, width", [(13, 5), (13, 13), (13, 64), (40, 8)])
def test_block_row_gram_is_the_full_gram(n, width):
    """The Gram is built from block rows of the upper triangle; widths that do and do not divide n."""
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(n + width))
    torch.testing.assert_close(_symmetric(_gram_upper(x, width)), x.T @ x, rtol=1e-5, atol=1e-4)
