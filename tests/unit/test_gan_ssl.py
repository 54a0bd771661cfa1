"""Semi-supervised GAN (Salimans et al. 2016, Sec. 5): K-class discriminator, label masks,
held-out accuracy on a toy labelled problem."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.meta import DataMeta
from pipeline.objectives.gan import GANConfig, build_phases
from pipeline.objectives.gan.noise import _content_uniform

META = DataMeta(sample_shape=(2,), data_kind="continuous", label_kind="class", num_classes=4)
CENTERS = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])



def blobs(n: int, gen: torch.Generator | None = None):
    y = torch.randint(0, 4, (n,), generator=gen)
    return CENTERS[y] + 0.7 * torch.randn(n, 2, generator=gen), y


def phases(mode: str, **kw):
    cfg = GANConfig(loss="non-saturating", latent_dim=8, latent_prior="normal", channels=[64, 64],
                    lr_d=1e-3, lr_g=1e-3, semi_supervised=mode, **kw)
    return build_phases(cfg, META, betas=(0.5, 0.9))


def test_content_split_is_a_function_of_the_sample_only():
    x, _ = blobs(64, torch.Generator().manual_seed(0))
    cache: dict = {}
    u = _content_uniform(x, cache)
    perm = torch.randperm(64)
    torch.testing.assert_close(_content_uniform(x[perm], cache), u[perm], rtol=0, atol=0)
    torch.testing.assert_close(_content_uniform(x[:5], {}), u[:5], rtol=0, atol=0)  # fresh cache
    assert ((u >= 0) & (u < 1)).all()
    # roughly uniform: the labelled/held-out fractions are what the config says
    big = _content_uniform(blobs(20000, torch.Generator().manual_seed(1))[0], cache)
    assert (big < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert (big >= 0.9).float().mean().item() == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("mode", ["labelled", "mixed", "unlabelled"])
def test_only_labelled_samples_labels_reach_the_loss(mode):
    d, _ = phases(mode, labelled_fraction=0.3, heldout_fraction=0.2)
    x, y = blobs(256, torch.Generator().manual_seed(0))
    u = _content_uniform(x, {})
    labelled = {"labelled": u < 0.8, "mixed": u < 0.3, "unlabelled": torch.zeros(256, dtype=torch.bool)}[mode]
    heldout = u >= 0.8
    y_scrambled = torch.where(labelled, y, (y + 1) % 4)  # change every label the loss must not use

    def sup_loss(labels):
        torch.manual_seed(5)  # same fakes
        return d.module({"x": x, "label": labels}, None)

    a, b = sup_loss(y), sup_loss(y_scrambled)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    ma = a.metrics()
    assert ma["labelled_count"] == labelled.sum().item() and ma["heldout_count"] == heldout.sum().item()
    assert not (labelled & heldout).any()
    if mode == "unlabelled":
        assert ma["loss_supervised"] == 0.0
    else:
        # scrambling a *used* label changes the loss
        i = int(labelled.nonzero()[0])
        y2 = y.clone()
        y2[i] = (y2[i] + 1) % 4
        assert sup_loss(y2).loss.item() != pytest.approx(a.loss.item(), rel=1e-7)
        # supervised term = cross-entropy over the labelled samples (Salimans et al. eq. for L_supervised)
        with torch.no_grad():
            logits = d.module.D(x)
        ce = torch.nn.functional.cross_entropy(logits[labelled], y[labelled])
        assert ma["loss_supervised"] == pytest.approx(ce.item(), rel=1e-5)


def train(mode: str, num_steps: int):
    torch.manual_seed(0)
    ph = phases(mode, labelled_fraction=0.05)
    opts = [torch.optim.Adam(p.module.parameters(), lr=p.lr, betas=p.betas) for p in ph]
    correct = count = 0.0
    for step in range(num_steps):
        for p, opt in zip(ph, opts):
            x, y = blobs(128)
            out = p.module({"x": x, "label": y}, None)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            if p.name == "d" and step >= num_steps // 2:
                m = out.metrics()
                correct, count = correct + m["heldout_correct"], count + m["heldout_count"]
    x, y = blobs(4000, torch.Generator().manual_seed(123))
    test_acc = (ph[0].module.classify(x).argmax(1) == y).float().mean().item()
    return correct / count, test_acc


def test_mixed_semi_supervised_accuracy_beats_chance():
    # 5% of samples labelled (~6 per batch of 128); 4 classes: chance is 0.25.
    heldout_acc, test_acc = train("mixed", 300)
    assert heldout_acc > 0.85, heldout_acc
    assert test_acc > 0.85, test_acc


def test_fully_labelled_setting_accuracy_beats_chance():
    heldout_acc, test_acc = train("labelled", 150)
    assert heldout_acc > 0.85 and test_acc > 0.85, (heldout_acc, test_acc)


def test_classify_needs_semi_supervised_mode():
    d, _ = build_phases(GANConfig(channels=[8], latent_dim=2), META, betas=(0.5, 0.9))
    with pytest.raises(ValueError, match="semi_supervised"):
        d.module.classify(torch.zeros(2, 2))
