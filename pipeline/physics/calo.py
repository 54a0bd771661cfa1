"""Calorimeter-like electromagnetic showers on a cylindrical voxel grid, with analytic means.

Geometry (CaloChallenge 2022 dataset 2 by default): ``num_layers`` x ``num_alpha`` x
``num_radial`` = 45 x 16 x 9 = 6480 voxels; layers of equal depth covering ``depth_x0``
radiation lengths, angular bins of 2 pi / num_alpha, radial bin edges
``r_max * (k / num_radial)^2`` Moliere radii (fine near the axis where the core is). A
voxel's flat index is ``(layer * num_alpha + alpha) * num_radial + r``; energies in MeV.

Physics: the parametrisation of Grindhammer and Peters (hep-ex/0001020, "The parameterized
simulation of electromagnetic showers in homogeneous and sampling calorimeters") for a
homogeneous medium of charge number Z, with y = E / E_c:

- longitudinal (their eq. 2): dE/dt = E f(t), f(t) = b (b t)^(a-1) e^(-b t) / Gamma(a),
  with the shower maximum T = (a - 1) / b = ln y - 0.858 and a = 0.21 + (0.492 + 2.38 / Z) ln y
  (their eqs. 5, 6; t in radiation lengths). The fraction of E in layer [t0, t1] is the
  closed-form Gamma integral P(a, b t1) - P(a, b t0) (regularised lower incomplete gamma).
- radial (their eqs. 13-17): f(r) = p f_C(r) + (1 - p) f_T(r), f_i(r) = 2 r R_i^2 /
  (r^2 + R_i^2)^2 (r in Moliere radii), whose CDF is r^2 / (r^2 + R_i^2); core radius
  R_C = z1 + z2 tau, tail R_T = k1 (e^(k3 (tau - k2)) + e^(k4 (tau - k2))), core weight
  p = p1 exp((p2 - tau) / p3 - exp((p2 - tau) / p3)), tau = t / T. Here the radial
  parameters are taken at each layer's centre depth, so the mean of every voxel is closed form.
- fluctuations: a shower is ``N ~ Poisson(spots_per_gev * (E / GeV)^0.876)`` energy spots
  (the E^0.876 growth of GP's eq. 19), each at a depth drawn from the Gamma profile, a radius
  from the two-component radial law of its layer and a uniform angle, carrying
  ``sampling_fraction * E / <N>`` times a Gamma(k, 1/k) factor (sampling fluctuations of the
  visible energy). Spots beyond the last layer or the outer radius are lost (leakage).

Hence E[voxel] = E * sampling_fraction * (layer fraction) * (radial-bin fraction of that
layer) / num_alpha exactly: :func:`mean_voxels`, :func:`mean_longitudinal_profile`,
:func:`mean_radial_profile` and :func:`mean_response` (the total-energy response
<E_dep / E_inc>) are the references the samples are tested against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import gammainc


@dataclass(frozen=True)
class CaloGeometry:
    num_layers: int = 45
    num_alpha: int = 16
    num_radial: int = 9
    depth_x0: float = 25.0  # total depth of the layers, radiation lengths
    r_max_moliere: float = 2.5  # outer edge of the last radial bin, Moliere radii

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_alpha, self.num_radial) < 1:
            raise ValueError(f"calo: --geometry needs layers, angular bins, radial bins >= 1, got "
                             f"{self.num_layers},{self.num_alpha},{self.num_radial}")
        if not (self.depth_x0 > 0 and self.r_max_moliere > 0):
            raise ValueError(f"calo: depth_x0 and r_max_moliere must be > 0, got {self.depth_x0}, {self.r_max_moliere}")

    @property
    def num_voxels(self) -> int:
        return self.num_layers * self.num_alpha * self.num_radial

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.num_layers, self.num_alpha, self.num_radial

    def layer_edges(self) -> np.ndarray:
        return np.linspace(0.0, self.depth_x0, self.num_layers + 1)

    def radial_edges(self) -> np.ndarray:
        return self.r_max_moliere * (np.arange(self.num_radial + 1) / self.num_radial) ** 2


@dataclass(frozen=True)
class CaloMaterial:
    z: float = 74.0  # tungsten
    critical_energy_mev: float = 8.0  # E_c of tungsten
    sampling_fraction: float = 0.02  # visible fraction of the deposited energy
    spots_per_gev: float = 50.0  # mean spots of a 1 GeV shower (sets the sampling resolution)
    spot_gamma_shape: float = 4.0  # k of each spot's Gamma(k, 1/k) energy factor

    def __post_init__(self) -> None:
        if not (self.z > 0 and self.critical_energy_mev > 0 and 0 < self.sampling_fraction <= 1
                and self.spots_per_gev > 0 and self.spot_gamma_shape > 0):
            raise ValueError(f"calo: material parameters out of range: {self}")


def longitudinal_params(energy_mev, material: CaloMaterial) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the Gamma profile at incident energies ``energy_mev`` (GP eqs. 5, 6)."""
    ln_y = np.log(np.asarray(energy_mev, dtype=np.float64) / material.critical_energy_mev)
    a = 0.21 + (0.492 + 2.38 / material.z) * ln_y
    t_max = ln_y - 0.858
    if np.any(a <= 1) or np.any(t_max <= 0):
        raise ValueError(f"calo: incident energies must be well above the critical energy "
                         f"({material.critical_energy_mev} MeV) for the Gamma profile; got min {np.min(energy_mev)} MeV")
    return a, (a - 1.0) / t_max


def radial_params(energy_mev, tau, material: CaloMaterial) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R_C, R_T, p) in Moliere radii at relative depth ``tau`` = t / T (GP eqs. 14-17;
    their E in GeV)."""
    ln_e = np.log(np.asarray(energy_mev, dtype=np.float64) / 1000.0)
    z = material.z
    r_core = (0.0251 + 0.00319 * ln_e) + (0.1162 - 0.000381 * z) * tau
    k2, k3, k4 = 0.645, -2.59, 0.3585 + 0.0421 * ln_e
    r_tail = (0.659 - 0.00309 * z) * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2)))
    p1, p2, p3 = 2.632 - 0.00094 * z, 0.401 + 0.00187 * z, 1.313 - 0.0686 * ln_e
    u = (p2 - tau) / p3
    p_core = p1 * np.exp(u - np.exp(u))  # <= p1 / e < 1 for any tau
    return r_core, r_tail, p_core


def _layer_radial_params(energy_mev: np.ndarray, geometry: CaloGeometry, material: CaloMaterial):
    """(R_C, R_T, p), each [n, num_layers], at the layer centres."""
    a, b = longitudinal_params(energy_mev, material)
    t_max = (a - 1.0) / b
    edges = geometry.layer_edges()
    tau = 0.5 * (edges[1:] + edges[:-1])[None, :] / t_max[:, None]
    return radial_params(np.asarray(energy_mev, dtype=np.float64)[:, None], tau, material)


def _radial_cdf(r: np.ndarray, r_core, r_tail, p_core) -> np.ndarray:
    return p_core * r**2 / (r**2 + r_core**2) + (1 - p_core) * r**2 / (r**2 + r_tail**2)


def layer_fractions(energy_mev, geometry: CaloGeometry, material: CaloMaterial) -> np.ndarray:
    """[n, num_layers]: the fraction of the incident energy deposited in each layer."""
    a, b = longitudinal_params(np.atleast_1d(energy_mev), material)
    cdf = gammainc(a[:, None], b[:, None] * geometry.layer_edges()[None, :])
    return np.diff(cdf, axis=1)


def radial_fractions(energy_mev, geometry: CaloGeometry, material: CaloMaterial) -> np.ndarray:
    """[n, num_layers, num_radial]: the fraction of a layer's energy in each radial bin."""
    e = np.atleast_1d(np.asarray(energy_mev, dtype=np.float64))
    rc, rt, p = (v[..., None] for v in _layer_radial_params(e, geometry, material))
    return np.diff(_radial_cdf(geometry.radial_edges(), rc, rt, p), axis=-1)


def mean_voxels(energy_mev, geometry: CaloGeometry, material: CaloMaterial) -> np.ndarray:
    """[n, num_layers, num_alpha, num_radial]: the exact mean deposit of every voxel, MeV."""
    e = np.atleast_1d(np.asarray(energy_mev, dtype=np.float64))
    lay = layer_fractions(e, geometry, material)[..., None] * radial_fractions(e, geometry, material)
    per_alpha = (e[:, None, None] * material.sampling_fraction * lay / geometry.num_alpha)[:, :, None, :]
    return np.broadcast_to(per_alpha, (len(e), *geometry.shape)).copy()


def mean_longitudinal_profile(energy_mev, geometry: CaloGeometry, material: CaloMaterial) -> np.ndarray:
    """[n, num_layers]: mean visible energy per layer divided by the incident energy."""
    return mean_voxels(energy_mev, geometry, material).sum(axis=(2, 3)) / np.atleast_1d(energy_mev)[:, None]


def mean_radial_profile(energy_mev, geometry: CaloGeometry, material: CaloMaterial) -> np.ndarray:
    """[n, num_radial]: mean visible energy per radial bin (all layers) / incident energy."""
    return mean_voxels(energy_mev, geometry, material).sum(axis=(1, 2)) / np.atleast_1d(energy_mev)[:, None]


def mean_response(energy_mev, geometry: CaloGeometry, material: CaloMaterial) -> np.ndarray:
    """[n]: the total-energy response <E_dep / E_inc> (sampling fraction x containment)."""
    return mean_voxels(energy_mev, geometry, material).sum(axis=(1, 2, 3)) / np.atleast_1d(energy_mev)


def simulate(energy_mev: np.ndarray, geometry: CaloGeometry, material: CaloMaterial,
             rng: np.random.Generator) -> np.ndarray:
    """Showers [n, num_voxels] float64 (MeV) at incident energies ``energy_mev`` [n]."""
    e = np.asarray(energy_mev, dtype=np.float64)
    n = len(e)
    a, b = longitudinal_params(e, material)
    mean_spots = material.spots_per_gev * (e / 1000.0) ** 0.876
    counts = rng.poisson(mean_spots)
    owner = np.repeat(np.arange(n), counts)  # shower of each spot
    t = rng.gamma(a[owner], 1.0 / b[owner])  # depth from f(t) itself
    layer = np.floor(t / geometry.depth_x0 * geometry.num_layers).astype(np.int64)
    inside = layer < geometry.num_layers
    owner, layer = owner[inside], layer[inside]
    rc, rt, p = (v[owner, layer] for v in _layer_radial_params(e, geometry, material))
    radius_scale = np.where(rng.random(len(owner)) < p, rc, rt)
    u = rng.random(len(owner))
    r = radius_scale * np.sqrt(u / (1.0 - u))  # inverse of the CDF r^2 / (r^2 + R^2)
    r_bin = np.searchsorted(geometry.radial_edges(), r, side="right") - 1
    alpha = rng.integers(0, geometry.num_alpha, size=len(owner))
    energy = (material.sampling_fraction * e / mean_spots)[owner] * rng.gamma(
        material.spot_gamma_shape, 1.0 / material.spot_gamma_shape, size=len(owner))
    kept = r_bin < geometry.num_radial
    voxel = ((layer * geometry.num_alpha + alpha) * geometry.num_radial + r_bin)[kept]
    flat = owner[kept] * geometry.num_voxels + voxel
    return np.bincount(flat, weights=energy[kept], minlength=n * geometry.num_voxels).reshape(n, geometry.num_voxels)


def sample_energies(num_samples: int, e_min_mev: float, e_max_mev: float, rng: np.random.Generator) -> np.ndarray:
    """Incident energies log-uniform on [e_min, e_max] MeV."""
    if not 0 < e_min_mev < e_max_mev:
        raise ValueError(f"calo: --energy-range needs 0 < min < max MeV, got {e_min_mev}, {e_max_mev}")
    return np.exp(rng.uniform(math.log(e_min_mev), math.log(e_max_mev), size=num_samples))


def info(geometry: CaloGeometry, material: CaloMaterial, e_min_mev: float, e_max_mev: float) -> dict:
    """Everything that defines the showers (stored as the HDF5 file's attributes)."""
    return {"geometry": asdict(geometry), "material": asdict(material),
            "energy_range_mev": [e_min_mev, e_max_mev]}
