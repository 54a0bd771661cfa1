"""The one label embedding (pipeline/models/embedding.py) that the VDM's denoiser and the GAN's
G and D share: its standardisation against a brute-force reference, its Fourier form against
the formula, and VDM checkpoints written before the VDM used it (layer names without
``embed.``) still loading."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pipeline.data.meta import DataMeta
from pipeline.models import MLP
from pipeline.models.embedding import LabelEmbedding, label_standardisation
from pipeline.models.gan_nets import build_gan_nets
from pipeline.objectives.vdm.denoiser import Denoiser


@pytest.mark.parametrize("values, range_, expected", [
    ((1.8, 2.0, 2.2, 2.4, 2.6, 3.0), None, (statistics.fmean([1.8, 2.0, 2.2, 2.4, 2.6, 3.0]),
                                            statistics.pstdev([1.8, 2.0, 2.2, 2.4, 2.6, 3.0]))),
    (None, (1e3, 1e6), ((1e3 + 1e6) / 2, (1e6 - 1e3) / 2)),  # too many to list: the range's end points
    ((2.5,), None, (2.5, 1.0)),  # one value: no spread to divide by
    (None, None, (0.5, 0.5)),  # the manifest records neither: [0, 1]
])
def test_standardisation_is_the_population_mean_and_std(values, range_, expected):
    mean, std = label_standardisation(values, range_)
    assert mean == pytest.approx(expected[0], rel=1e-14) and std == pytest.approx(expected[1], rel=1e-14)


def test_fourier_form_is_the_mlp_of_the_standardised_values_sin_and_cos():
    torch.manual_seed(0)
    emb = LabelEmbedding("continuous", 6, label_mean=2.0, label_std=0.5, features="fourier")
    y = torch.tensor([2.0, 3.0])
    t = (y - 2.0) / 0.5
    freqs = torch.exp(torch.linspace(math.log(1 / 4), math.log(8.0), 3))
    features = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb(y), emb.embed(features))


def test_both_objectives_hold_the_same_embedding_type():
    meta = DataMeta(sample_shape=(2,), data_kind="continuous", label_kind="continuous", label_values=(1.0, 3.0))
    d = Denoiser(MLP(2, 8, 1, 8), 8, meta)
    g, disc = build_gan_nets(sample_shape=(2,), latent_dim=2, widths=[4], arch="mlp", bounded=False,
                             label_kind="continuous", label_values=meta.label_values)
    for e in (d.label_emb, g.label_embedding, disc.label_embedding):
        assert type(e) is LabelEmbedding and (e.label_mean, e.label_std) == (2.0, 1.0)


@pytest.mark.parametrize("label_kind", ["class", "continuous"])
def test_a_vdm_state_dict_of_before_the_shared_embedding_loads(label_kind):
    meta = DataMeta(sample_shape=(2,), data_kind="continuous", label_kind=label_kind, num_classes=3,
                    label_values=(1.0, 2.0) if label_kind == "continuous" else None)
    torch.manual_seed(0)
    written = Denoiser(MLP(2, 8, 1, 8), 8, meta)
    old = {k.replace("label_emb.embed.", "label_emb."): v for k, v in written.state_dict().items()}
    assert any(k.startswith("label_emb.") and ".embed." not in k for k in old)  # the old names
    torch.manual_seed(1)
    fresh = Denoiser(MLP(2, 8, 1, 8), 8, meta)
    fresh.load_state_dict(old)  # strict: every key found, none left over
    for (name, p), q in zip(written.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
