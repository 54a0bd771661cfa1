"""Refactoring keeps training bitwise identical: the first 20 steps of every preset, on 1
process and on 2 (DDP, DeepSpeed ZeRO-2, FSDP), against the metrics recorded before the
architecture change (tests/golden/presets.py says how they were recorded)."""

from __future__ import annotations

import json

import pytest

from tests.golden.presets import CASES, GOLDEN, run_case, write_datasets

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("preset_golden")]


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("golden-data"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_first_steps_bitwise_equal_to_record(case, golden_data, tmp_path):
    expected = json.loads(GOLDEN.read_text())[case.name]
    got = run_case(case, golden_data[case.data], tmp_path / "run")
    assert len(got) == len(expected), f"{case.name}: {len(got)} logged steps, recorded {len(expected)}"
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        assert g.keys() == e.keys(), f"{case.name} step {step}: metric names differ: {sorted(g.keys() ^ e.keys())}"
        diff = {k: (g[k], e[k]) for k in e if g[k] != e[k]}
        assert not diff, f"{case.name} step {step}: metrics differ from the record (got, recorded): {diff}"
