"""`pipeline bench samplers`: the comparison with the 128-step ancestral reference (the issue's target)."""

from __future__ import annotations

import math

from pipeline.bench.samplers import compare_with_reference


def _row(name, steps, e, se):
    return {"sampler": name, "num_steps": steps, "energy_per_spin": e, "energy_stderr": se, "samples_per_s": 1.0}


def test_target_is_a_sampler_at_most_32_steps_within_one_joint_standard_error():
    rows = [_row("ancestral", 128, -0.80, 0.003), _row("ddim", 32, -0.796, 0.004), _row("dpm-solver", 16, -0.79, 0.003),
            _row("dpm-solver", 64, -0.80, 0.003)]
    s = compare_with_reference(rows)
    assert s["target_met"] is True and s["within_1_sigma_at_le_32_steps"] == ["ddim@32"]  # 0.004 / 0.005 = 0.8 sigma
    assert math.isclose(rows[1]["sigma_vs_reference"], 0.8)
    assert math.isclose(rows[2]["sigma_vs_reference"], 0.01 / math.hypot(0.003, 0.003))
    # 64 steps is close but does not count; nor does the reference itself
    rows = [_row("ancestral", 128, -0.80, 0.003), _row("ancestral", 32, -0.81, 0.003), _row("dpm-solver", 64, -0.80, 0.003)]
    assert compare_with_reference(rows)["target_met"] is False
    assert compare_with_reference([_row("ddim", 8, -0.8, 0.01)]) == {"target_met": None, "reference": None}
