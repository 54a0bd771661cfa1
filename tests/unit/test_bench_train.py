"""`pipeline bench train`: the figures' arithmetic from metrics.jsonl, argument checks, the
bare loop, and (integration) a smoke run at the tiny --quick size."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys

import pytest

from pipeline.bench import train as bt
from tests.conftest import REPO, subprocess_env


def _write_metrics(run, intervals, saves):
    run.mkdir(parents=True)
    lines = [{"event": "start", "step": -1}]
    for step, step_time in intervals:
        lines.append({"step": step, "perf/step_time_s": step_time, "train/samples_seen": step * 32})
    lines += [{"event": "checkpoint", "step": s, "seconds": sec} for s, sec in saves]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_read_run_skips_the_first_interval_and_takes_the_median(tmp_path):
    # First interval (start-up) is slow, one interval holds a checkpoint (outlier).
    _write_metrics(tmp_path / "r", [(5, 9.0), (10, 0.10), (15, 0.12), (20, 0.50), (25, 0.11)], [(20, 0.3), (25, 0.5)])
    got = bt.read_run(tmp_path / "r")
    median = statistics.median([0.10, 0.12, 0.50, 0.11])  # 0.115
    assert got["steps_per_s"] == pytest.approx(1 / median)
    assert got["samples_per_s"] == pytest.approx(32 / median)  # 32 samples per step
    assert got["checkpoint_s"] == pytest.approx(0.4)


def test_read_run_needs_two_intervals(tmp_path):
    _write_metrics(tmp_path / "r", [(5, 0.1)], [])
    with pytest.raises(ValueError, match="at least 2 logging intervals"):
        bt.read_run(tmp_path / "r")


def test_arguments_are_checked():
    parser = argparse.ArgumentParser()
    bt.register(parser.add_subparsers())
    a = parser.parse_args(["train", "--quick", "--backends", "ddp,zero3"])
    assert a.backends == ["ddp", "zero3"] and a.func is bt._main
    for bad in (["train", "--backends", "horovod"], ["train", "--num-steps", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(ValueError, match="--num-steps must be >= 2"):
        bt._main(parser.parse_args(["train", "--num-steps", "1"]))


def test_bare_loop_trains_the_same_model(tmp_path):
    shards = bt.write_spin_shards(tmp_path / "data", size=4, num_samples=64)
    config = tmp_path / "c.yaml"
    config.write_text("run: {dir: unused}\ndata: {train_urls: unused}\ntrain: {num_steps: 1}\n")
    args = argparse.Namespace(num_timesteps=4, channels=4)
    rate = bt.bare_loop_steps_per_s(config, shards, [*bt._model_overrides(args), "data.batch_per_rank=4"],
                                    num_steps=3, threads=1)
    assert math.isfinite(rate) and rate > 0


@pytest.mark.integration
def test_quick_bench_prints_finite_figures(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "bench", "train", "--quick", "--backends", "ddp",
                        "--work-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr[-5000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("ratio_vs_bare_loop", "dp_efficiency", "checkpoint_share"):
        assert math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    assert out["checkpoint_share"] < 1
    assert set(out["peak_rss_mb"]) == {"ddp"} and 50 < out["peak_rss_mb"]["ddp"] < 24 * 1024
