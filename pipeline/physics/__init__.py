"""Physical systems used as data and as references: the 2D Ising model and its observables."""

from pipeline.physics.ising import (
    T_CRITICAL,
    boltzmann_weights,
    enumerate_states,
    exact_energy_per_spin,
    exact_entropy_per_spin,
    exact_free_energy_per_spin,
    exact_log_partition_function,
    exact_magnetisation,
    exact_specific_heat,
    sample_ising,
)
from pipeline.physics.observables import (
    abs_magnetisation,
    correlation_length,
    energy_per_spin,
    magnetisation,
    specific_heat,
    susceptibility,
    to_spins,
    two_point_correlation,
    two_sample_pvalue,
    wasserstein1,
)

__all__ = [
    "T_CRITICAL",
    "abs_magnetisation",
    "boltzmann_weights",
    "correlation_length",
    "energy_per_spin",
    "enumerate_states",
    "exact_energy_per_spin",
    "exact_entropy_per_spin",
    "exact_free_energy_per_spin",
    "exact_log_partition_function",
    "exact_magnetisation",
    "exact_specific_heat",
    "magnetisation",
    "sample_ising",
    "specific_heat",
    "susceptibility",
    "to_spins",
    "two_point_correlation",
    "two_sample_pvalue",
    "wasserstein1",
]
