"""Calorimeter-like showers: the analytic profiles against independent integrals, the sample
means against them within exact standard errors, and `pipeline shards calo`'s file layout."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import gamma as gamma_fn

from pipeline.cli import main as pipeline_main
from pipeline.physics import calo

MATERIAL = calo.CaloMaterial()


def _ab(energy_mev: float) -> tuple[float, float]:
    """Grindhammer-Peters a and b, from their defining relations (hep-ex/0001020 eqs. 5, 6)."""
    ln_y = math.log(energy_mev / MATERIAL.critical_energy_mev)
    a = 0.21 + (0.492 + 2.38 / MATERIAL.z) * ln_y
    return a, (a - 1) / (ln_y - 0.858)


@pytest.mark.parametrize("energy", [1e3, 3e4, 1e6])
def test_layer_fractions_are_the_gamma_integrals(energy):
    g = calo.CaloGeometry(num_layers=20, depth_x0=25.0)
    a, b = _ab(energy)
    f = lambda t: b * (b * t) ** (a - 1) * math.exp(-b * t) / gamma_fn(a)  # noqa: E731 - dE/dt / E
    edges = g.layer_edges()
    ref = [quad(f, t0, t1, epsabs=1e-13)[0] for t0, t1 in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(calo.layer_fractions(energy, g, MATERIAL)[0], ref, rtol=1e-8, atol=1e-13)
    t = np.linspace(0.01, 25, 250001)  # the profile peaks at T = ln y - 0.858
    assert t[np.argmax([f(v) for v in t])] == pytest.approx(math.log(energy / MATERIAL.critical_energy_mev) - 0.858,
                                                             abs=1e-3)


def test_radial_fractions_are_the_integrals_of_the_two_component_law():
    g = calo.CaloGeometry(num_layers=5, num_radial=6)
    energy = 2e4
    rc, rt, p = calo.radial_params(energy, (2.5 + 5 * np.arange(5)) / (math.log(energy / 8.0) - 0.858), MATERIAL)
    fr = calo.radial_fractions(energy, g, MATERIAL)[0]
    edges = g.radial_edges()
    for j in range(5):
        dens = lambda r: (p[j] * 2 * r * rc[j] ** 2 / (r**2 + rc[j] ** 2) ** 2  # noqa: E731
                          + (1 - p[j]) * 2 * r * rt[j] ** 2 / (r**2 + rt[j] ** 2) ** 2)
        ref = [quad(dens, r0, r1)[0] for r0, r1 in zip(edges[:-1], edges[1:])]
        np.testing.assert_allclose(fr[j], ref, rtol=1e-9)
        assert quad(dens, 0, np.inf)[0] == pytest.approx(1.0, rel=1e-9)  # a normalised density


@pytest.mark.parametrize("energy", [2e3, 1e5])
def test_sample_means_converge_to_the_analytic_profiles(energy):
    """Mean longitudinal and radial profiles and the response of 400 showers at one energy,
    against the analytic means, with the exact standard error of a compound Poisson sum:
    a region holding a fraction q of the spots has variance lambda q e^2 (1 + 1/k) for spots
    of mean energy e, Gamma(k, 1/k) factors and lambda spots on average."""
    g, n = calo.CaloGeometry(), 400
    x = calo.simulate(np.full(n, energy), g, MATERIAL, np.random.default_rng(7)).reshape(n, *g.shape)
    lam = MATERIAL.spots_per_gev * (energy / 1000) ** 0.876
    e_spot = MATERIAL.sampling_fraction * energy / lam
    var_per_q = lam * e_spot**2 * (1 + 1 / MATERIAL.spot_gamma_shape)

    def check(observed_sum, reference_fraction):  # reference fraction of the incident energy
        q = reference_fraction / MATERIAL.sampling_fraction  # fraction of spots
        se = np.sqrt(var_per_q * q / n) / energy
        z = (observed_sum.mean(0) / energy - reference_fraction) / np.where(se > 0, se, 1)
        assert np.abs(z).max() < 4.5, z

    check(x.sum(axis=(2, 3)), calo.mean_longitudinal_profile(energy, g, MATERIAL)[0])
    check(x.sum(axis=(1, 2)), calo.mean_radial_profile(energy, g, MATERIAL)[0])
    check(x.sum(axis=(1, 2, 3))[:, None], calo.mean_response([energy], g, MATERIAL))
    check(x[:, 10].sum(-1), calo.mean_voxels(energy, g, MATERIAL)[0, 10].sum(-1) / energy)  # each angle of a layer
    # The means are not trivially met: one more radiation length of depth per layer is seen.
    shifted = calo.mean_longitudinal_profile(energy, calo.CaloGeometry(depth_x0=27.0), MATERIAL)[0]
    with pytest.raises(AssertionError):
        check(x.sum(axis=(2, 3)), shifted)


def test_response_is_sampling_fraction_times_containment():
    g = calo.CaloGeometry()
    e = np.array([1e3, 1e4, 1e5, 1e6])
    contained = (calo.layer_fractions(e, g, MATERIAL)[..., None] * calo.radial_fractions(e, g, MATERIAL)).sum((1, 2))
    np.testing.assert_allclose(calo.mean_response(e, g, MATERIAL), MATERIAL.sampling_fraction * contained, rtol=1e-12)
    assert np.all(contained < 1) and np.all(contained > 0.8)


def test_cli_writes_the_calochallenge_layout(tmp_path, capsys):
    out = tmp_path / "calo.h5"
    argv = ["shards", "calo", "--num-samples", "300", "--out", str(out), "--geometry", "6,4,3", "--seed", "2"]
    assert pipeline_main(argv) == 0
    with h5py.File(out) as f:
        assert sorted(f) == ["incident_energies", "showers"]
        x, e = f["showers"][()], f["incident_energies"][()]
        assert f["showers"].dtype == np.float32 and f["incident_energies"].dtype == np.float32
        assert '"num_layers": 6' in f.attrs["calo"]
    assert x.shape == (300, 72) and e.shape == (300, 1) and np.all(x >= 0)
    assert 1e3 <= e.min() and e.max() <= 1e6
    # log-uniform: log10 E is uniform on [3, 6] (KS distance well inside 300 samples' spread)
    u = np.sort((np.log10(e[:, 0]) - 3) / 3)
    assert np.abs(u - (np.arange(1, 301) - 0.5) / 300).max() < 1.63 / math.sqrt(300)
    assert pipeline_main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert pipeline_main([*argv, "--overwrite"]) == 0
    with h5py.File(out) as f:
        assert np.array_equal(f["showers"][()], x)  # the same options, the same showers
    for bad, msg in ((["--geometry", "6,4"], "three numbers"), (["--energy-range", "5", "1e3"], "critical energy"),
                     (["--energy-range", "1e4", "1e3"], "0 < min < max")):
        assert pipeline_main(["shards", "calo", "--num-samples", "3", "--out", str(tmp_path / "b.h5"), *bad]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "b.h5").exists()


def test_evaluator_on_true_and_distorted_showers():
    from pipeline.eval.calo import compare_calo

    g = calo.CaloGeometry(num_layers=12, num_alpha=4, num_radial=5)
    rng = np.random.default_rng(11)
    e = calo.sample_energies(600, 1e3, 1e5, rng)
    x = calo.simulate(e, g, MATERIAL, rng)
    good = compare_calo(x, e, g, MATERIAL)
    assert abs(good["response_z"]) < 4 and good["longitudinal_max_abs_z"] < 4.5 and good["radial_max_abs_z"] < 4.5
    assert good["longitudinal_num_bins_judged"] >= 6 and good["response_analytic"] == pytest.approx(
        calo.mean_response(e, g, MATERIAL).mean())
    bad = compare_calo(x * 1.05, e, g, MATERIAL)  # 5 % too much energy everywhere
    assert bad["response_rel_err"] == pytest.approx(good["response_rel_err"] * 1.05 + 0.05, abs=1e-9)
    assert bad["response_z"] > 5
    shifted = compare_calo(np.roll(x.reshape(600, *g.shape), 1, axis=1), e, g, MATERIAL)  # one layer deeper
    assert shifted["longitudinal_max_abs_z"] > 10


def test_flags_name_profiles_and_response_beyond_five_percent_and_the_noise():
    from pipeline.eval.calo import calo_flags, compare_calo

    g = calo.CaloGeometry(num_layers=12, num_alpha=4, num_radial=5)
    rng = np.random.default_rng(12)
    e = calo.sample_energies(1200, 1e3, 1e5, rng)
    x = calo.simulate(e, g, MATERIAL, rng)
    data = {f"{k}_data": v for k, v in compare_calo(x[600:], e[600:], g, MATERIAL).items()}
    assert calo_flags({**compare_calo(x[:600], e[:600], g, MATERIAL), **data}) == []
    hot = compare_calo(x[:600] * 1.10, e[:600], g, MATERIAL)  # 10 % too much energy
    flags = calo_flags({**hot, **data})
    assert len(flags) == 3 and flags[2].startswith(f"total-energy response off by {abs(hot['response_rel_err']):.1%}")
    assert calo_flags({**hot, **data}, tolerance=0.2) == []
    # Wild samples (the energy scale missed, standard errors as large as the means): flagged
    # though every z-score is small.
    wild = rng.normal(0, 400, size=x[:600].shape) * x[:600].mean() + x[:600]
    wild_result = {**compare_calo(wild, e[:600], g, MATERIAL), **data}
    assert any(f.startswith("longitudinal profile") for f in calo_flags(wild_result))


def test_classifier_auc_is_a_half_for_one_source_and_high_for_a_shifted_one():
    """Two independent draws of the same showers: AUC within 4 null standard errors of 0.5
    (the Mann-Whitney null, exact for a classifier that ignores its input); showers one layer
    deeper, a shift the profiles see at > 10 sigma: AUC far above that band."""
    from pipeline.eval.calo import calo_classifier_auc

    g = calo.CaloGeometry(num_layers=12, num_alpha=4, num_radial=5)
    rng = np.random.default_rng(12)
    e1, e2 = calo.sample_energies(600, 1e3, 1e5, rng), calo.sample_energies(600, 1e3, 1e5, rng)
    x1, x2 = calo.simulate(e1, g, MATERIAL, rng), calo.simulate(e2, g, MATERIAL, rng)
    same = calo_classifier_auc(x1, e1, x2, e2, seed=0)
    se = same["classifier_auc_null_stderr"]
    assert se == pytest.approx(math.sqrt(601 / (12 * 300 * 300)))
    assert same["classifier_num_test"] == 600 and same["classifier_num_train"] == 600
    assert abs(same["classifier_auc"] - 0.5) < 4 * se
    assert calo_classifier_auc(x1, e1, x2, e2, seed=0) == same  # seeded
    deeper = np.roll(x2.reshape(600, *g.shape), 1, axis=1)
    shifted = calo_classifier_auc(x1, e1, deeper, e2, seed=0)
    assert shifted["classifier_auc"] > 0.5 + 10 * se
