"""The GPU check's CPU-only self-test (issue 18, section 4): scripts/device_check.sh parses its
arguments and says what it would do, the wheel list covers every third-party import of the
project, and the summary collects what the steps wrote."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "device_check.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_dry_run_lists_every_step_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = _sh("--dry-run", "--out", str(out), "--wheels", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    for step in ("install", "gpu_tests", "bench_train", "bench_scale_10m", "bench_scale_100m"):
        assert f"  {step} (timeout" in r.stdout
    assert "pytest -q -m gpu tests/gpu" in r.stdout
    assert "--no-index --no-deps" in r.stdout and str(tmp_path / "w") in r.stdout
    assert "bench scale --device cuda --preset 100m" in r.stdout
    assert not out.exists()
    skipped = _sh("--dry-run", "--skip-bench")
    assert skipped.returncode == 0 and "bench_" not in skipped.stdout


def test_bad_arguments_exit_2_naming_what_is_allowed(tmp_path):
    r = _sh("--frobnicate")
    assert r.returncode == 2 and "unknown argument '--frobnicate'" in r.stderr and "--dry-run" in r.stderr
    r = _sh("--out")
    assert r.returncode == 2 and "--out needs a directory" in r.stderr
    r = _sh("--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "make device-wheels" in r.stderr
    assert not (tmp_path / "o").exists()
    assert _sh("--help").returncode == 0


def test_wheel_list_covers_every_third_party_import():
    dw = _load("device_wheels")
    missing = dw.uncovered_imports([REPO / "pipeline", REPO / "tests", REPO / "scripts"])
    assert missing == {}, f"imported but neither shipped as a wheel nor on the device: {missing}"
    names = {r.split("==")[0] for r in dw.device_requirements()}
    # What the issue names as missing there, and nothing the device already has.
    assert {"deepspeed", "webdataset", "wandb", "datasets", "braceexpand"} <= names
    assert not names & {"torch", "accelerate", "h5py", "numpy"}


def test_uncovered_import_is_reported(tmp_path, monkeypatch):
    dw = _load("device_wheels")
    (tmp_path / "m.py").write_text("import webdataset\nimport no_such_module_xyz\nimport json\n")
    without = [n for n in dw.project_requirements() if n != "webdataset"]
    monkeypatch.setattr(dw, "project_requirements", lambda: without)
    missing = dw.uncovered_imports([tmp_path])
    assert set(missing) == {"webdataset", "no_such_module_xyz"}
    assert "no installed distribution" in missing["no_such_module_xyz"]


def test_summary_collects_steps_and_bench_json(tmp_path):
    (tmp_path / "bench_train.log").write_text('progress\n{"samples_per_s": 5.0}\n')
    (tmp_path / "install.log").write_text("")
    steps = [{"step": "install", "rc": 0, "seconds": 3, "log": str(tmp_path / "install.log")},
             {"step": "bench_train", "rc": 1, "seconds": 9, "log": str(tmp_path / "bench_train.log")}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert _load("device_summary").main(str(tmp_path)) == 0
    summary = json.loads((tmp_path / "device_check.json").read_text())
    assert summary["ok"] is False
    assert summary["steps"]["bench_train"] == {"rc": 1, "seconds": 9, "result": {"samples_per_s": 5.0}}
    assert "available" in summary["gpu"] or summary["gpu"] == {"torch": None}


@pytest.mark.parametrize("target", ["device-wheels"])
def test_make_target_exists(target):
    r = subprocess.run(["make", "-n", target, "PY=python3"], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "scripts/device_wheels.py download" in r.stdout
