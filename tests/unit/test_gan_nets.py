"""GAN networks: shapes, output ranges, symmetries, conditioning, spectral norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.models.gan_nets import (
    ConvDiscriminator,
    ConvGenerator,
    LabelEmbedding,
    MLPDiscriminator,
    MLPGenerator,
    build_gan_nets,
)


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 8, 12)])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_conv_shapes_and_bounded_output(shape, padding):
    torch.manual_seed(0)
    g, d = build_gan_nets(sample_shape=shape, latent_dim=5, widths=[8, 16], arch="conv", bounded=True,
                          padding_mode=padding)
    x = g(torch.randn(4, 5) * 10)
    assert x.shape == (4, *shape)
    assert x.abs().max() < 1.0  # tanh: spins/levels live in [-1, 1]
    assert d(x).shape == (4, 1)


def test_mlp_shapes_and_unbounded_output():
    torch.manual_seed(0)
    g, d = build_gan_nets(sample_shape=(2, 3), latent_dim=4, widths=[16], arch="mlp", bounded=False,
                          d_outputs=5)
    x = g(torch.randn(10, 4) * 100)
    assert x.shape == (10, 2, 3) and x.abs().max() > 1.0
    assert d(x).shape == (10, 5)


def test_circular_discriminator_is_invariant_under_lattice_translations():
    # Two stride-2 stages: exact invariance under cyclic shifts by multiples of 4 (periodic
    # boundary conditions + global pooling); zero padding breaks it at the borders.
    torch.manual_seed(0)
    x = torch.randint(0, 2, (3, 1, 16, 16)).float() * 2 - 1
    shifted = torch.roll(x, shifts=(4, -8), dims=(2, 3))
    d_circ = ConvDiscriminator((1, 16, 16), [8, 16], padding_mode="circular")
    torch.testing.assert_close(d_circ(shifted), d_circ(x), rtol=1e-5, atol=1e-5)
    d_zero = ConvDiscriminator((1, 16, 16), [8, 16], padding_mode="zeros")
    assert not torch.allclose(d_zero(shifted), d_zero(x), atol=1e-4)


def test_circular_generator_commutes_with_translations_of_its_feature_map():
    # With circular padding every conv commutes with cyclic shifts: shifting the first feature
    # map by k shifts the output by 2**n * k.
    torch.manual_seed(0)
    g = ConvGenerator(3, (1, 16, 16), [4, 8], bounded=True, padding_mode="circular")
    h0 = torch.randn(2, *g.start_shape)
    out = g._output(g.net(h0))
    out_shifted = g._output(g.net(torch.roll(h0, 1, dims=2)))
    torch.testing.assert_close(out_shifted, torch.roll(out, 4, dims=2), rtol=1e-5, atol=1e-6)


def test_conditional_nets_depend_on_labels_and_require_them():
    torch.manual_seed(0)
    g, d = build_gan_nets(sample_shape=(1, 8, 8), latent_dim=4, widths=[8], arch="conv", bounded=True,
                          label_kind="class", num_classes=3)
    h = torch.randn(2, 4)
    x0, x2 = g(h, torch.tensor([0, 0])), g(h, torch.tensor([2, 2]))
    assert not torch.allclose(x0, x2)
    assert not torch.allclose(d(x0, torch.tensor([0, 0])), d(x0, torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="labels are required"):
        g(h)
    with pytest.raises(ValueError, match="labels are required"):
        d(x0)


def test_continuous_label_embedding_standardises_with_data_label_values():
    emb = LabelEmbedding("continuous", 4, label_mean=2.5, label_std=0.5)
    out = emb(torch.tensor([3.0, 2.0]))
    # the MLP sees (3.0 - 2.5) / 0.5 = 1 and (2.0 - 2.5) / 0.5 = -1
    torch.testing.assert_close(out, emb.embed(torch.tensor([[1.0], [-1.0]])))
    g, _ = build_gan_nets(sample_shape=(2,), latent_dim=2, widths=[4], arch="mlp", bounded=False,
                          label_kind="continuous", label_values=(1.0, 2.0, 3.0))
    e = g.label_embedding
    assert e.label_mean == pytest.approx(2.0) and e.label_std == pytest.approx((2 / 3) ** 0.5)


def test_spectral_norm_bounds_layer_norm():
    torch.manual_seed(0)
    d = MLPDiscriminator((6,), [32, 32], spectral_norm=True)
    with torch.no_grad():
        for _ in range(30):  # power iterations run in training-mode forwards
            d(torch.randn(8, 6))
    d.eval()
    for layer in [d.net[1], d.net[3], d.head]:
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.02)
    plain = MLPDiscriminator((6,), [32, 32], spectral_norm=False)
    assert torch.linalg.matrix_norm(plain.net[1].weight.detach(), ord=2) != pytest.approx(1.0, abs=0.02)


def test_shape_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvGenerator(2, (1, 10, 10), [4, 4], bounded=True)
    with pytest.raises(ValueError, match="too small"):
        ConvDiscriminator((1, 4, 4), [4, 4, 4])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ConvDiscriminator((16,), [4])
    with pytest.raises(ValueError, match="num_classes"):
        LabelEmbedding("class", 4, num_classes=None)
    with pytest.raises(ValueError, match="single output"):
        MLPDiscriminator((3,), [4], num_outputs=3, label_embedding=LabelEmbedding("class", 4, 3))
    assert MLPGenerator(2, (3,), [4], bounded=False)(torch.zeros(1, 2)).shape == (1, 3)


def test_lattice_observables_match_the_numpy_observables_and_brute_force_correlations():
    import numpy as np

    from pipeline.models.gan_features import lattice_observables
    from pipeline.physics.observables import abs_magnetisation, energy_per_spin

    rng = np.random.default_rng(0)
    s = np.where(rng.random((5, 6, 6)) < 0.7, 1, -1).astype(np.int8)
    s[0] = 1  # all up: c1 = c_diag = c2 = |m| = 1
    s[1] = np.indices((6, 6)).sum(axis=0) % 2 * 2 - 1  # checkerboard: c1 = -1, c_diag = c2 = +1, m = 0
    f = lattice_observables(torch.tensor(s, dtype=torch.float64)[:, None]).numpy()
    # Independent references: the evaluator's energy (E/N = -2 c1 for J = 1) and |m|, and a
    # brute-force loop over sites for the diagonal and distance-2 correlations.
    np.testing.assert_allclose(-2 * f[:, 0], energy_per_spin(s), atol=1e-12)
    np.testing.assert_allclose(f[:, 1], f[:, 0] ** 2, atol=1e-12)
    np.testing.assert_allclose(f[:, 4], abs_magnetisation(s), atol=1e-12)
    np.testing.assert_allclose(f[:, 5], s.mean(axis=(1, 2)) ** 2, atol=1e-12)
    for b in range(5):
        diag = [s[b, i, j] * s[b, (i + 1) % 6, (j + 1) % 6] for i in range(6) for j in range(6)]
        anti = [s[b, i, j] * s[b, (i + 1) % 6, (j - 1) % 6] for i in range(6) for j in range(6)]
        d2 = [s[b, i, j] * (s[b, (i + 2) % 6, j] + s[b, i, (j + 2) % 6]) / 2 for i in range(6) for j in range(6)]
        assert f[b, 2] == pytest.approx((np.mean(diag) + np.mean(anti)) / 2, abs=1e-12)
        assert f[b, 3] == pytest.approx(np.mean(d2), abs=1e-12)
    np.testing.assert_allclose(f[0], [1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(f[1], [-1, 1, 1, 1, 0, 0])


def test_discriminator_with_lattice_observables_sees_them_and_checks_its_input():
    torch.manual_seed(0)
    kw = dict(sample_shape=(1, 8, 8), latent_dim=4, widths=[4, 8], arch="conv", bounded=True,
              padding_mode="circular", label_kind="continuous", label_values=(2.0, 3.0))
    _, d = build_gan_nets(**kw, lattice_observables=True)
    _, d_plain = build_gan_nets(**kw)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([2.0, 3.0, 2.0])
    assert d(x, t).shape == (3, 1)
    assert d.features(x).shape[1] == d_plain.features(x).shape[1] + 6
    # D's output depends on the observables: zeroing their head weights changes it.
    before = d(x, t).detach()
    with torch.no_grad():
        d.head.weight[:, -6:] = 0
        d.label_embedding.embed[-1].weight[-6:] = 0
        d.label_embedding.embed[-1].bias[-6:] = 0
    assert not torch.allclose(before, d(x, t))
    with pytest.raises(ValueError, match="circular"):
        build_gan_nets(**{**kw, "padding_mode": "zeros"}, lattice_observables=True)
    with pytest.raises(ValueError, match="conv networks"):
        build_gan_nets(**{**kw, "arch": "mlp", "widths": [8]}, lattice_observables=True)


def test_film_generator_starts_as_the_plain_one_and_then_conditions_every_stage():
    torch.manual_seed(0)
    kw = dict(sample_shape=(1, 8, 8), latent_dim=4, widths=[4, 8], arch="conv", bounded=True,
              padding_mode="circular", label_kind="continuous", label_values=(2.0, 3.0))
    g_film, _ = build_gan_nets(**kw, g_film=True)
    torch.manual_seed(0)
    g_plain, _ = build_gan_nets(**kw)
    h, t = torch.randn(3, 4), torch.tensor([2.0, 3.0, 2.5])
    # gamma = beta = 0 at init: same weights -> the same output as without FiLM
    torch.testing.assert_close(g_film(h, t), g_plain(h, t))
    with torch.no_grad():
        g_film.film[-1].weight.normal_()
    assert not torch.allclose(g_film(h, t), g_plain(h, t))
    loss = g_film(h, t).sum()
    loss.backward()
    assert all(lin.weight.grad.abs().sum() > 0 for lin in g_film.film)
    with pytest.raises(ValueError, match="conditional"):
        ConvGenerator(4, (1, 8, 8), [4], bounded=True, film=True)


def test_noise_inputs_extend_the_latent_start_silent_and_reach_every_stage():
    torch.manual_seed(0)
    g = ConvGenerator(4, (1, 16, 16), [4, 8], bounded=True, padding_mode="circular", noise_inputs=True)
    assert g.noise_shapes == [(8, 8), (16, 16)] and g.latent_dim == 4 + 64 + 256
    h = torch.randn(3, g.latent_dim)
    h2 = h.clone()
    h2[:, 4:] = torch.randn(3, 320)  # only the noise maps differ
    torch.testing.assert_close(g(h), g(h2))  # strengths start at 0
    g(h).sum().backward()
    assert all(s.grad.abs().sum() > 0 for s in g.noise_strength)
    with torch.no_grad():
        for s in g.noise_strength:
            s.fill_(1.0)
    assert not torch.allclose(g(h), g(h2))
    # each stage's map acts there: changing only the 16x16 map changes the output
    h3 = h.clone()
    h3[:, 4 + 64:] = torch.randn(3, 256)
    assert not torch.allclose(g(h), g(h3))


def test_convs_per_stage_adds_units_at_each_resolution_with_their_own_noise_and_film():
    kw = dict(sample_shape=(1, 16, 16), latent_dim=4, widths=[4, 8], arch="conv", bounded=True,
              padding_mode="circular", label_kind="continuous", label_values=(2.0, 3.0))
    g1, _ = build_gan_nets(**kw, g_film=True, g_noise_inputs=True)
    g2, _ = build_gan_nets(**kw, g_film=True, g_noise_inputs=True, g_convs_per_stage=2)
    # one plain unit per stage keeps the plain G's layers (and state_dict keys)
    assert [type(m).__name__ for m in g1.net] == ["Upsample", "Conv2d", "ReLU"] * 2 + ["Conv2d"]
    assert [type(m).__name__ for m in g2.net] == (["Upsample", "Conv2d", "ReLU", "Identity", "Conv2d", "ReLU"] * 2
                                                  + ["Conv2d"])
    assert [m.out_channels for m in g2.net if isinstance(m, torch.nn.Conv2d)] == [8, 8, 4, 4, 1]
    assert g2.noise_shapes == [(8, 8), (8, 8), (16, 16), (16, 16)] and g2.latent_dim == 4 + 2 * 64 + 2 * 256
    assert len(g2.film) == 4 and [lin.out_features for lin in g2.film] == [16, 16, 8, 8]
    h, t = torch.randn(3, g2.latent_dim), torch.tensor([2.0, 3.0, 2.5])
    y = g2(h, t)
    assert y.shape == (3, 1, 16, 16) and y.abs().max() < 1
    with torch.no_grad():
        for s in g2.noise_strength:
            s.fill_(1.0)
    # the second 16x16 unit's noise map (the last 256 entries) acts at the finest resolution
    h2 = h.clone()
    h2[:, -256:] = torch.randn(3, 256)
    assert not torch.allclose(g2(h, t), g2(h2, t))
    with pytest.raises(ValueError, match="convs_per_stage"):
        ConvGenerator(4, (1, 8, 8), [4], bounded=True, convs_per_stage=0)
    with pytest.raises(ValueError, match="conv networks"):
        build_gan_nets(**{**kw, "arch": "mlp", "widths": [8]}, g_convs_per_stage=2)


# ------------------------------------------------------------------ 1D and 3D fields

ND_SHAPES = [(2, 16), (1, 8, 12), (1, 8, 4, 12)]  # (C, L), (C, H, W), (C, D, H, W); unequal axes


@pytest.mark.parametrize("shape", ND_SHAPES)
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_conv_nets_in_every_dimension(shape, padding):
    torch.manual_seed(0)
    g, d = build_gan_nets(sample_shape=shape, latent_dim=5, widths=[4, 8], arch="conv", bounded=False,
                          padding_mode=padding, label_kind="continuous", label_values=(0.1, 0.3), g_film=True,
                          g_noise_inputs=True, g_convs_per_stage=2)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert convs and all(len(m.kernel_size) == len(shape) - 1 for m in convs)
    # noise maps: one per conv unit (2 per stage) at its resolution, S / 2 and S
    stage_sites = [math.prod(s // 2**k for s in shape[1:]) for k in (1, 0)]
    assert g.latent_dim == 5 + 2 * sum(stage_sites)
    labels = torch.tensor([0.1, 0.3, 0.1])
    x = g(torch.randn(3, g.latent_dim), labels)
    assert x.shape == (3, *shape) and torch.isfinite(x).all()
    assert d(x, labels).shape == (3, 1)
    x.sum().backward()  # gradients reach G's every part
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("shape", [(1, 16), (1, 8, 16, 8)])
def test_circular_discriminator_is_invariant_under_translations_in_1d_and_3d(shape):
    torch.manual_seed(0)
    x = torch.randn(3, *shape)
    dims = tuple(range(2, 2 + len(shape) - 1))
    shifted = torch.roll(x, shifts=tuple(4 * (k + 1) for k in range(len(dims))), dims=dims)
    d_circ = ConvDiscriminator(shape, [4, 8], padding_mode="circular")
    torch.testing.assert_close(d_circ(shifted), d_circ(x), rtol=1e-5, atol=1e-5)
    d_zero = ConvDiscriminator(shape, [4, 8], padding_mode="zeros")
    assert not torch.allclose(d_zero(shifted), d_zero(x), atol=1e-4)


def test_nd_shape_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvGenerator(2, (1, 8, 8, 6), [4, 4], bounded=False)
    with pytest.raises(ValueError, match=r"1, 2 or 3 spatial dimensions"):
        ConvGenerator(2, (1, 4, 4, 4, 4), [4], bounded=False)
    with pytest.raises(ValueError, match="lattice observables"):
        ConvDiscriminator((1, 8, 8, 8), [4], padding_mode="circular", lattice_observables=True)


def test_without_a_hidden_head_d_only_compares_single_receptive_fields():
    """D with a linear head is a mean over positions of a function of one receptive field
    (<= 10 sites for two stride-2 stages of kernel 4). Swapping the second halves of two
    periodic 1D fields that agree wherever a receptive field crosses a junction leaves the
    multiset of receptive fields of the pair as it was, so the pair's summed score is
    unchanged, although each field's sum (its k = 0 mode) changes. With gan.d_head_hidden
    (a nonlinearity after the pooling) the sum changes: D can tell lattice-wide spreads."""
    torch.manual_seed(0)
    L = 64
    x1, x2 = torch.randn(1, 1, L), torch.randn(1, 1, L)
    agree = [*range(23, 42), *range(55, 64), *range(0, 10)]  # within 9 sites of the junctions 0 and 32
    x2[..., agree] = x1[..., agree]
    y1 = torch.cat([x1[..., :32], x2[..., 32:]], dim=-1)
    y2 = torch.cat([x2[..., :32], x1[..., 32:]], dim=-1)
    assert not torch.allclose(y1.sum(), x1.sum())
    pair_x, pair_y = torch.cat([x1, x2]), torch.cat([y1, y2])
    linear = ConvDiscriminator((1, L), [8, 16], padding_mode="circular")
    torch.testing.assert_close(linear(pair_y).sum(), linear(pair_x).sum(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(linear(pair_y), linear(pair_x), atol=1e-4)  # each field's score does change
    hidden = ConvDiscriminator((1, L), [8, 16], padding_mode="circular", head_hidden=16)
    assert (hidden(pair_y).sum() - hidden(pair_x).sum()).abs() > 1e-4
    # still invariant under the translations (multiples of 4 sites)
    torch.testing.assert_close(hidden(torch.roll(pair_x, 8, dims=-1)), hidden(pair_x), rtol=1e-5, atol=1e-6)


def test_d_head_hidden_builds_through_the_config_and_needs_the_conv_nets():
    from pipeline.config import ConfigError
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.gan.config import GANConfig
    from pipeline.objectives.gan.nets import build_nets

    meta = DataMeta(sample_shape=(1, 16, 16), data_kind="continuous", boundary="periodic")
    _, d = build_nets(GANConfig(channels=[8, 16], d_head_hidden=12), meta)
    assert d.post[0].in_features == 16 and d.head.in_features == 12
    with pytest.raises(ConfigError, match="d_head_hidden > 0 needs the conv networks"):
        build_nets(GANConfig(channels=[8, 16], d_head_hidden=12, arch="mlp"), meta)
    with pytest.raises(ConfigError, match="d_head_hidden must be >= 0"):
        GANConfig(d_head_hidden=-1).validate()


def test_spectral_amplitudes_against_plane_waves_and_the_magnetisation():
    """Each channel's mean Fourier amplitude per shell round(|m|): a plane wave of
    wavevector m = (3, 4) (|m| = 5) on a 16 x 12 torus puts amplitude A sqrt(V) / 2 on its two
    modes +-m, so shell 5 holds A sqrt(V) / 2 * 2 / (modes in shell 5) and every other shell
    ~0; shell 0 is |mean| sqrt(V); any translation leaves every feature unchanged, and each
    is 1-Lipschitz in the field (the bound a WGAN-GP critic's inputs must keep)."""
    from pipeline.models.gan_features import shell_matrix, spectral_amplitudes

    H, W = 16, 12
    shells = shell_matrix((H, W))
    iy, ix = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    m_y, m_x = torch.fft.fftfreq(H, 1 / H)[:, None], torch.fft.fftfreq(W, 1 / W)[None, :]
    in_shell_5 = int(((m_y**2 + m_x**2).sqrt().round() == 5).sum())
    wave = 0.7 * torch.cos(2 * math.pi * (3 * iy / H + 4 * ix / W)) + 0.25  # plus a uniform 0.25
    a = spectral_amplitudes(wave[None, None], shells)[0]
    V = H * W
    torch.testing.assert_close(a[5], torch.tensor(0.7 * math.sqrt(V) / 2 * 2 / in_shell_5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[0], torch.tensor(0.25 * math.sqrt(V)), rtol=1e-5, atol=1e-5)
    others = [s for s in range(a.numel()) if s not in (0, 5)]
    assert a[others].abs().max() < 1e-4
    torch.manual_seed(0)
    x, y = torch.randn(2, 64, 2, H, W)
    ax, ay = spectral_amplitudes(x, shells), spectral_amplitudes(y, shells)
    assert ax.shape == (64, 2 * shells.shape[1])
    torch.testing.assert_close(spectral_amplitudes(torch.roll(x, (5, 7), (2, 3)), shells), ax, rtol=1e-4, atol=1e-5)
    assert ((ax - ay).abs().max(dim=1).values <= (x - y).flatten(1).norm(dim=1) + 1e-5).all()


def test_d_spectral_features_need_periodic_fields():
    from pipeline.config import ConfigError
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.gan.config import GANConfig
    from pipeline.objectives.gan.nets import build_nets

    periodic = DataMeta(sample_shape=(1, 16, 16), data_kind="continuous", boundary="periodic")
    _, d = build_nets(GANConfig(channels=[8, 16], d_spectral_features=True), periodic)
    assert d.head.in_features == 16 + 12  # pooled conv features + shells 0..11 of a 16 x 16 torus
    assert "shells" not in d.state_dict()  # a function of the shape: checkpoints stay as they were
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(d(torch.roll(x, (4, 8), (2, 3))), d(x), rtol=1e-5, atol=1e-5)
    open_ = DataMeta(sample_shape=(1, 16, 16), data_kind="continuous", boundary="open")
    with pytest.raises(ConfigError, match=r"d_spectral_features=true needs periodic fields .* padding 'zeros'"):
        build_nets(GANConfig(channels=[8, 16], d_spectral_features=True), open_)
    with pytest.raises(ConfigError, match=r"d_spectral_features=true needs periodic fields"):
        build_nets(GANConfig(channels=[8], arch="mlp", d_spectral_features=True),
                   DataMeta(sample_shape=(6,), data_kind="continuous"))


def test_mlp_discriminator_reads_the_shell_amplitudes_beside_the_field():
    """The MLP D with gan.d_spectral_features: its first layer reads [the flattened field, the
    mean Fourier amplitude per shell], the latter computed by hand here (k = 0: sqrt(V) |M|)."""
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.gan.config import GANConfig
    from pipeline.objectives.gan.nets import build_nets

    periodic = DataMeta(sample_shape=(1, 16, 16), data_kind="continuous", boundary="periodic")
    _, d = build_nets(GANConfig(channels=[8], arch="mlp", d_spectral_features=True), periodic)
    first = d.net[1]
    assert first.in_features == 256 + 12 and "shells" not in d.state_dict()
    x = torch.randn(3, 1, 16, 16)
    amp = torch.fft.fft2(x[:, 0]).abs() / 16
    k = torch.fft.fftfreq(16, 1 / 16)
    shell = (k[:, None] ** 2 + k[None, :] ** 2).sqrt().round().long()
    by_hand = torch.stack([amp[:, shell == s].mean(1) for s in range(12)], dim=1)
    torch.testing.assert_close(by_hand[:, 0], x.flatten(1).sum(1).abs() / 16)
    expected = d.net[2:](first(torch.cat([x.flatten(1), by_hand], dim=1)))
    torch.testing.assert_close(d.features(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_mode_path_shifts_each_field_by_a_latent_constant():
    """gan.g_zero_mode: G's output = the plain G's + a per-channel constant linear in the
    vector latent. At initialisation it is the plain G exactly (same weights, same output);
    with the path's weights set, each sample's field moves by W h + b at every site, so
    only the k = 0 mode changes, and the per-site noise maps do not reach it."""
    torch.manual_seed(0)
    plain = ConvGenerator(6, (2, 8, 8), [8, 16], bounded=False, padding_mode="circular", noise_inputs=True)
    torch.manual_seed(0)
    zm = ConvGenerator(6, (2, 8, 8), [8, 16], bounded=False, padding_mode="circular", noise_inputs=True,
                       zero_mode=True)
    assert zm.latent_dim == plain.latent_dim
    h = torch.randn(5, zm.latent_dim)
    torch.testing.assert_close(zm(h), plain(h))
    with torch.no_grad():
        zm.zero_mode.weight.normal_()
        zm.zero_mode.bias.fill_(0.3)
    shift = zm(h) - plain(h)
    expected = h[:, :6] @ zm.zero_mode.weight.T.detach() + 0.3
    torch.testing.assert_close(shift, expected[:, :, None, None].expand_as(shift), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="zero-mode path need the conv networks"):
        build_gan_nets(sample_shape=(4,), latent_dim=3, widths=[8], arch="mlp", bounded=False, g_zero_mode=True)


def test_conv_sizes_are_checked_with_the_config_and_name_the_stages_that_fit():
    """Before anything is built or written: 12 x 6 fields take one stride-2 stage (6 = 2 x 3),
    so gan.channels=[8, 16, 32] (three) is refused, naming one entry as what fits."""
    from pipeline.config import ConfigError
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.gan.config import GANConfig

    meta = DataMeta(sample_shape=(1, 12, 6), data_kind="continuous", boundary="periodic")
    with pytest.raises(ConfigError, match=r"divisible by 8; the data's samples are \(1, 12, 6\): use at most 1 "
                                          r"entries in gan.channels \(e.g. \[8\]\)"):
        GANConfig(channels=[8, 16, 32]).check_data(meta)
    assert GANConfig(channels=[8]).check_data(meta)[0] == "conv"
    assert GANConfig(channels=[8, 16, 32], arch="mlp").check_data(meta)[0] == "mlp"


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("conv", (1, 8, 8)), ("conv", (2, 16))])
def test_sign_symmetric_generator_flips_on_the_first_latent_entry_only(arch, shape):
    """gan.g_sign_symmetric: G'(h) = sign(h_0) G(|h_0|, h_1, ...). So flipping h_0 flips the
    sample exactly (the output distribution is symmetric under x -> -x for a latent prior
    symmetric in h_0), and with h_0 > 0 G' is the wrapped G (which may draw one mode only)."""
    from pipeline.models.gan_symmetry import SignSymmetricGenerator

    torch.manual_seed(0)
    plain, _ = build_gan_nets(sample_shape=shape, latent_dim=6, widths=[8], arch=arch, bounded=False,
                              padding_mode="circular" if arch == "conv" else "zeros")
    torch.manual_seed(0)
    sym, _ = build_gan_nets(sample_shape=shape, latent_dim=6, widths=[8], arch=arch, bounded=False,
                            padding_mode="circular" if arch == "conv" else "zeros", g_sign_symmetric=True)
    assert isinstance(sym, SignSymmetricGenerator) and sym.latent_dim == plain.latent_dim
    h = torch.randn(7, sym.latent_dim)
    h[:3, 0] = h[:3, 0].abs()  # both signs present
    h[3:, 0] = -h[3:, 0].abs()
    flipped = h.clone()
    flipped[:, 0] = -flipped[:, 0]
    with torch.no_grad():
        out, out_flipped, out_plain = sym(h), sym(flipped), plain(h)
    torch.testing.assert_close(out_flipped, -out)
    torch.testing.assert_close(out[:3], out_plain[:3])  # h_0 > 0: G itself
    torch.testing.assert_close(out[3:], -plain(flipped[3:]))  # h_0 < 0: minus G at |h_0|
    assert float((out[3:] + out_plain[3:]).abs().max()) > 1e-3  # ... which is not minus G at h_0
    sym(h).sum().backward()
    assert all(p.grad is not None for p in sym.parameters())


def test_sign_symmetric_generator_is_refused_for_levels_data():
    from pipeline.config import ConfigError
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.gan.config import GANConfig

    levels = DataMeta(sample_shape=(1, 8, 8), data_kind="levels", num_levels=17)
    with pytest.raises(ConfigError, match=r"g_sign_symmetric=true .* 'levels' data .*spins and continuous"):
        GANConfig(channels=[8], g_sign_symmetric=True).check_data(levels)
    spins = DataMeta(sample_shape=(1, 8, 8), data_kind="spins")
    assert GANConfig(channels=[8], g_sign_symmetric=True).check_data(spins)[0] == "conv"


def test_minibatch_std_is_the_mean_over_features_of_each_groups_std():
    """gan.d_minibatch_std's feature against numpy: per group of consecutive samples, the
    population std of each feature, averaged over features, the same for every member."""
    from pipeline.models.gan_features import MinibatchStd

    x = torch.randn(12, 5, dtype=torch.float64) * torch.arange(1, 6)
    out = MinibatchStd(4)(x)
    assert out.shape == (12, 6)
    torch.testing.assert_close(out[:, :5], x)
    groups = x.numpy().reshape(3, 4, 5)
    expected = np.sqrt(groups.var(axis=1) + 1e-8).mean(axis=1)  # [3]
    np.testing.assert_allclose(out[:, 5].numpy(), np.repeat(expected, 4), rtol=1e-6)
    assert len(set(np.round(expected, 6))) == 3  # the groups differ, so a mix-up would show
    with pytest.raises(ValueError, match=r"batch \(10 samples\) to be a multiple of its group size 4"):
        MinibatchStd(4)(x[:10])
    assert MinibatchStd(4)(x[:3]).shape == (3, 6)  # fewer samples than a group: one group (StyleGAN)


@pytest.mark.parametrize("hidden", [[16], [16, 8]])
def test_mlp_d_with_minibatch_std_couples_a_group_and_nothing_else(hidden):
    """The D phase puts [real, fake, interpolates] through D in one forward: with the minibatch
    std, each part's scores must be what D gives that part alone (groups never cross parts),
    a sample's score must depend on its group's other members, and not on other groups."""
    torch.manual_seed(0)
    D = MLPDiscriminator((1, 4, 4), hidden, minibatch_std=4)
    plain = MLPDiscriminator((1, 4, 4), hidden)
    real, fake = torch.randn(8, 1, 4, 4), 3 * torch.randn(8, 1, 4, 4)
    with torch.no_grad():
        both = D(torch.cat([real, fake]))
        torch.testing.assert_close(both[:8], D(real))
        torch.testing.assert_close(both[8:], D(fake))
        other_member, other_group = real.clone(), real.clone()
        other_member[1] += 1.0
        other_group[5] += 1.0
        assert float((D(other_member)[0] - D(real)[0]).abs()) > 1e-4
        torch.testing.assert_close(D(other_group)[:4], D(real)[:4])
        # without it, D is per sample
        torch.testing.assert_close(plain(other_member)[0], plain(real)[0])
    assert sum(p.numel() for p in D.parameters()) == sum(p.numel() for p in plain.parameters()) + hidden[-1]


def test_minibatch_std_config_errors():
    from pipeline.config import ConfigError, load_config
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.gan.config import GANConfig

    for bad in (-1, 1):
        with pytest.raises(ConfigError, match=r"gan.d_minibatch_std is a group size: 0 \(off\) or >= 2"):
            GANConfig(d_minibatch_std=bad).validate()
    with pytest.raises(ConfigError, match=r"d_minibatch_std needs gan.semi_supervised=off"):
        GANConfig(d_minibatch_std=4, semi_supervised="labelled").validate()
    field = DataMeta(sample_shape=(1, 8, 8), data_kind="continuous", boundary="periodic")
    with pytest.raises(ConfigError, match=r"d_minibatch_std > 0 needs the MLP networks .* gan.arch='conv'"):
        GANConfig(channels=[8], d_minibatch_std=4).check_data(field)
    assert GANConfig(channels=[8], arch="mlp", d_minibatch_std=4).check_data(field)[0] == "mlp"
    base = ["run.dir=/tmp/r", "data.train_urls=/tmp/d", "train.num_steps=10", "objective=gan",
            "gan.d_minibatch_std=4"]
    with pytest.raises(ConfigError, match=r"data.batch_per_rank=62 is not a multiple of it"):
        load_config(None, base + ["data.batch_per_rank=62"])
    assert load_config(None, base + ["data.batch_per_rank=64"]).gan.d_minibatch_std == 4


@pytest.mark.parametrize("shape, padding, observables, head_hidden, spectral", [
    ((1, 16, 16), "circular", True, 0, False),
    ((1, 16, 16), "zeros", False, 0, False),
    ((2, 8, 16), "zeros", False, 0, False),
    ((1, 8, 8, 8), "circular", False, 0, True),
    ((3, 32), "circular", False, 0, True),
    ((1, 16, 16), "circular", True, 12, True),
])
def test_conv_discriminator_feature_dim_is_the_width_of_its_features(shape, padding, observables, head_hidden,
                                                                      spectral):
    """The projection's label embedding is built from feature_dim before D: it must be the
    width D's features come out with for every combination of the options."""
    d = ConvDiscriminator(shape, [4, 6], padding_mode=padding, lattice_observables=observables,
                          head_hidden=head_hidden, spectral_features=spectral)
    width = d.features(torch.randn(2, *shape)).shape[1]
    assert width == ConvDiscriminator.feature_dim(shape, [4, 6], padding, observables, head_hidden, spectral)
    assert d.head.in_features == width


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("conv", (1, 8, 8))])
def test_sign_symmetric_discriminator_is_the_mean_of_d_at_x_and_minus_x(arch, shape):
    from pipeline.models.gan_symmetry import SignSymmetricDiscriminator

    torch.manual_seed(0)
    _, plain = build_gan_nets(sample_shape=shape, latent_dim=6, widths=[8], arch=arch, bounded=False,
                              padding_mode="circular" if arch == "conv" else "zeros", label_kind="continuous",
                              label_range=(1.0, 2.0))
    torch.manual_seed(0)
    _, sym = build_gan_nets(sample_shape=shape, latent_dim=6, widths=[8], arch=arch, bounded=False,
                            padding_mode="circular" if arch == "conv" else "zeros", label_kind="continuous",
                            label_range=(1.0, 2.0), g_sign_symmetric=True, d_sign_symmetric=True)
    assert isinstance(sym, SignSymmetricDiscriminator)
    x, labels = torch.randn(5, *shape), torch.rand(5) + 1.0
    with torch.no_grad():
        torch.testing.assert_close(sym(-x, labels), sym(x, labels))
        torch.testing.assert_close(sym(x, labels), 0.5 * (plain(x, labels) + plain(-x, labels)))
        assert float((plain(x, labels) - plain(-x, labels)).abs().max()) > 1e-4  # D itself is not symmetric
    with pytest.raises(ValueError, match="needs g_sign_symmetric"):
        build_gan_nets(sample_shape=shape, latent_dim=6, widths=[8], arch=arch, bounded=False, d_sign_symmetric=True)
