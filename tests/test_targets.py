import pytest
from torch import nn

from conftest import ARCHS, tiny_model
from rankcut.errors import ConfigError
from rankcut.targets import find_decoder_blocks, find_targets


@pytest.mark.parametrize("arch", ARCHS)
def test_discovers_every_decoder_linear(arch):
    model = tiny_model(arch)
    prefix, blocks = find_decoder_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 3
    targets = find_targets(model)
    assert len(targets) == 7 * 3
    suffixes = {t.name.rsplit(".", 1)[1] for t in targets}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    k_proj = next(t for t in targets if t.name.endswith("0.self_attn.k_proj"))
    assert k_proj.shape == (2 * 16, 64)  # GQA: 2 key/value heads of width 16
    assert all("embed" not in t.name and "lm_head" not in t.name for t in targets)


def test_exclude_and_no_targets():
    model = tiny_model()
    targets = find_targets(model, exclude=["*.k_proj", "model.layers.0.*"])
    assert len(targets) == 7 * 2 - 2
    with pytest.raises(ConfigError, match="no target linear modules"):
        find_targets(model, exclude=["*"])
    with pytest.raises(ConfigError, match="no list of repeated blocks"):
        find_targets(nn.Sequential(nn.Linear(2, 2)))
