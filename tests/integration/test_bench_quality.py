"""`pipeline bench quality`: a real budgeted training run (real shards, `pipeline train`
stopped by SIGTERM at each fraction of the budget and resumed), its curve and JSON; its input
errors; and the W1 noise floor against an exact hypergeometric expectation.

No quality or speed is asserted: the budget is seconds, on a machine as loaded as it is.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import hypergeom

from pipeline.bench.quality import MAX_FLOOR_SPLITS, QualityOptions, energy_w1_floor
from pipeline.errors import ConfigError
from tests.conftest import run_pipeline

TINY = ["vdm.num_timesteps=10", "vdm.channels=4", "vdm.emb_dim=8", "data.batch_per_rank=16",
        "train.log_every_steps=5", "train.checkpoint_every_steps=1000", "train.num_sample_images=4"]
KEYS = ("energy_rel_err", "energy_err_sigma", "w1_over_floor", "elbo_over_entropy", "minutes", "load_avg")


def test_bench_quality_smoke(tmp_path, ising_shards):
    out = tmp_path / "bench"
    r = run_pipeline("bench", "quality", "--config", "configs/quickstart.yaml", "--minutes", "0.3", "--out", str(out),
                     "--num-samples", "32", "--num-steps", "4", "--elbo-num-samples", "8", "--elbo-noise-samples", "2",
                     f"data.train_urls={ising_shards}", *TINY, timeout=300)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bench"] == "quality"
    for k in KEYS:
        assert isinstance(result[k], float) and math.isfinite(result[k]), (k, result[k])
    rows = result["rows"]
    assert [row["fraction"] for row in rows] == [0.25, 0.5, 0.75, 1.0]  # one row per checkpoint fraction
    assert all(b["minutes"] >= a["minutes"] and b["step"] >= a["step"] for a, b in zip(rows, rows[1:]))
    assert result["step"] == rows[-1]["step"] >= 1
    for row in rows:
        assert math.isfinite(row["w1_floor"]) and row["w1_floor"] > 0
        assert (out / f"at-{row['fraction']:g}" / "export" / "export.json").is_file()
    assert set(result["targets"]) == {"energy_within_1pct", "energy_within_2_sigma", "w1_le_1.5_floor",
                                      "elbo_le_1.02_entropy"}
    # Each stop before train.num_steps went through the loop's preemption checkpoint, and each
    # training process after the first resumed from the one before.
    log = (out / "train.log").read_text()
    num_preempted = sum(not row["finished"] for row in rows)
    num_processes = num_preempted + any(row["finished"] for row in rows)
    assert log.count("preempted: checkpoint at step") == num_preempted
    assert log.count("resumed from step") == num_processes - 1


def test_bench_quality_bad_minutes_exits_2_before_writing(tmp_path):
    out = tmp_path / "bench"
    r = run_pipeline("bench", "quality", "--config", "configs/quickstart.yaml", "--minutes", "0", "--out", str(out),
                     check=False, timeout=120)
    assert r.returncode == 2
    assert "--minutes must be a finite number > 0, got 0" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    ({"fractions": (0.5, 0.25, 1.0)}, "--fractions must increase strictly"),
    ({"fractions": (0.25, 0.5)}, "end at 1"),
    ({"minutes": float("nan")}, "--minutes must be a finite number"),
    ({"overrides": ["run.dir=/tmp/x"]}, "run.dir is the bench's"),
    ({"num_samples": 1}, "--num-samples must be >= 2"),
    ({"elbo_num_samples": 1}, "--elbo-num-samples 0 (skip) or >= 2"),
])
def test_quality_options_name_the_bad_input(tmp_path, change, message):
    opts = QualityOptions(config="configs/quickstart.yaml", minutes=1.0, out=tmp_path / "fresh")
    for k, v in change.items():
        setattr(opts, k, v)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        opts.validate()


def test_quality_options_refuse_a_used_out_dir(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        QualityOptions(config="c.yaml", minutes=1.0, out=tmp_path / "used").validate()


def _two_energy_lattices(num_ordered: int, num_total: int, size: int = 4) -> np.ndarray:
    """All-up lattices (energy -2 per spin) and checkerboards (+2 per spin), shuffled."""
    up = np.ones((size, size), dtype=np.int8)
    checker = np.where((np.arange(size)[:, None] + np.arange(size)) % 2 == 0, 1, -1).astype(np.int8)
    x = np.stack([up] * num_ordered + [checker] * (num_total - num_ordered))
    return x[np.random.default_rng(5).permutation(num_total)]


def test_w1_floor_matches_the_exact_hypergeometric_expectation():
    # Energies take two values 4 apart, so W1 between a draw of n lattices and the other m = N - n
    # is 4 |k/n - (K - k)/m|, k ~ Hypergeometric(N, K, n): its mean and spread are exact sums.
    n, num_total, num_ordered = 100, 100 * (MAX_FLOOR_SPLITS + 1), 700
    m = num_total - n
    k = np.arange(n + 1)
    w1 = 4 * np.abs(k / n - (num_ordered - k) / m)
    pmf = hypergeom(num_total, num_ordered, n).pmf(k)
    mean, sd = float(np.sum(pmf * w1)), float(np.sqrt(np.sum(pmf * w1**2) - np.sum(pmf * w1) ** 2))
    floors = [energy_w1_floor(_two_energy_lattices(num_ordered, num_total), 3.0, n, seed) for seed in range(20)]
    # 20 seeds x 16 disjoint draws; draws within a seed are nearly independent (n << N).
    se = sd / math.sqrt(20 * MAX_FLOOR_SPLITS)
    assert abs(np.mean(floors) - mean) < 4 * se, (np.mean(floors), mean, se)


def test_w1_floor_needs_two_draws_worth_of_reference():
    with pytest.raises(ConfigError, match="needs at least 20"):
        energy_w1_floor(_two_energy_lattices(5, 15), 3.0, 10, 0)
