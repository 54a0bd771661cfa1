"""The one map between stored values and model space that the VDM and the GAN share."""

import pytest
import torch

from pipeline.data.meta import DataMeta
from pipeline.objectives.data_space import DataSpace


def _space(kind, **kw):
    return DataSpace(DataMeta(sample_shape=(1, 4, 4), data_kind=kind, **kw))


@pytest.mark.parametrize("k", [2, 3, 17])
def test_levels_map_onto_equally_spaced_values_and_back(k):
    s = _space("levels", num_levels=k)
    levels = torch.arange(float(k))
    y = s.to_model(levels)
    # k equally spaced points from -1 to 1, the decoder's grid, index i <-> level i.
    torch.testing.assert_close(y, s.values())
    torch.testing.assert_close(y, -1 + 2 * levels / (k - 1))
    assert torch.equal(s.value_index(levels), levels.long())
    torch.testing.assert_close(s.to_data(y), levels)
    # a hard decision: slightly perturbed model values go to the nearest level
    torch.testing.assert_close(s.to_data(y + 0.4 / (k - 1)), levels)


def test_spins_and_continuous():
    s = _space("spins")
    x = torch.tensor([-1.0, 1.0, 1.0])
    assert torch.equal(s.to_model(x), x) and torch.equal(s.value_index(x), torch.tensor([0, 1, 1]))
    assert torch.equal(s.to_data(torch.tensor([-0.2, 0.0, 0.7])), torch.tensor([-1.0, 1.0, 1.0]))
    assert s.bounded
    c = _space("continuous")
    x = torch.randn(5)
    assert c.values() is None and not c.bounded and torch.equal(c.to_model(x), x) and torch.equal(c.to_data(x), x)


def test_values_the_kind_cannot_hold_are_refused():
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        _space("spins").to_model(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="integer values 0..3"):
        _space("levels", num_levels=4).to_model(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="num_levels >= 2"):
        _space("levels", num_levels=1)
    with pytest.raises(ValueError, match="allowed: spins, levels, continuous"):
        _space("bits")
