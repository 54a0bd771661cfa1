"""Refactoring keeps training identical: the first 20 steps of every preset, on 1 process and
on 2 (DDP, DeepSpeed ZeRO-2, FSDP), against the recorded metrics; bitwise on the machine kind
of the record, within a stated tolerance on another (tests/golden/presets.py says how and why)."""

from __future__ import annotations

import json

import pytest

from tests.golden.presets import CASES, GOLDEN, RTOL_OTHER_MACHINE, machine, mismatches, run_case, write_datasets

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("preset_golden")]


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("golden-data"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_first_steps_equal_to_record(case, golden_data, tmp_path):
    record = json.loads(GOLDEN.read_text())
    expected = record["cases"][case.name]
    here = machine()
    rtol = 0.0 if record["machine"] == here else RTOL_OTHER_MACHINE
    how = "bitwise" if rtol == 0 else f"within {rtol:g} relative (recorded on {record['machine']!r}, this is {here!r})"
    got = run_case(case, golden_data[case.data], tmp_path / "run")
    assert len(got) == len(expected), f"{case.name}: {len(got)} logged steps, recorded {len(expected)}"
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        assert g.keys() == e.keys(), f"{case.name} step {step}: metric names differ: {sorted(g.keys() ^ e.keys())}"
        diff = mismatches(g, e, rtol)
        assert not diff, f"{case.name} step {step}: metrics differ from the record, compared {how} (got, recorded): {diff}"


def test_the_comparison_is_bitwise_or_within_its_tolerance_and_no_wider():
    rec = {"loss": 1.0, "nan": float("nan"), "step": 3, "flag": "a"}
    assert not mismatches(dict(rec), rec, 0.0)
    assert set(mismatches({**rec, "loss": 1.0 + 1e-12}, rec, 0.0)) == {"loss"}  # bitwise means bitwise
    assert not mismatches({**rec, "loss": 1.0 + 0.5 * RTOL_OTHER_MACHINE}, rec, RTOL_OTHER_MACHINE)
    assert set(mismatches({**rec, "loss": 1.0 + 2 * RTOL_OTHER_MACHINE}, rec, RTOL_OTHER_MACHINE)) == {"loss"}
    assert set(mismatches({**rec, "nan": 0.0, "step": 4, "flag": "b"}, rec, 1.0)) == {"nan", "step", "flag"}
