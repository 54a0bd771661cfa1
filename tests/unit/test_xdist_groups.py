"""make test runs on 2 xdist workers with --dist loadgroup and relies on ``xdist_group`` marks:
tests that share a resource (the local SLURM cluster) or a module-scoped fixture that launches
training run on one worker, so the fixture runs once. A pytest / xdist pair that ignores the
marks (pytest 9.2 with xdist 3.8: pytest-dev/pytest-xdist#1386) would do nothing visible but
slow the suite down (or let SLURM tests collide): this run of a small suite fails instead."""

from __future__ import annotations

import os
import subprocess
import sys

GROUPED = '''
import os, pytest
pytestmark = pytest.mark.xdist_group("g")

@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    with open(os.path.join(os.environ["GROUP_OUT"], f"grouped-{i}"), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])
'''
FREE = '''
import pytest

@pytest.mark.parametrize("i", range(6))
def test_free(i):
    pass
'''


def test_loadgroup_sends_a_group_to_one_worker(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_grouped.py").write_text(GROUPED)
    (suite / "test_free.py").write_text(FREE)
    (tmp_path / "workers").mkdir()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                        str(suite)], cwd=suite, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "GROUP_OUT": str(tmp_path / "workers")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    workers = {f.name: f.read_text() for f in (tmp_path / "workers").iterdir()}
    assert len(workers) == 6, workers
    assert len(set(workers.values())) == 1, f"one xdist_group ran on several workers: {workers}"
