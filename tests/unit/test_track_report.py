"""`pipeline report`: PNGs from a synthetic metrics.jsonl, errors exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.track.images import save_grid_png
from pipeline.track.report import read_metrics


def _write_run(run, *, vdm=True, gan=True):
    lines = [{"event": "start", "step": -1, "time": 0.0}]
    for step in range(1, 21):
        row = {"step": step, "time": float(step)}
        if vdm:
            row.update({"vdm/recon_bpd": 0.01, "vdm/prior_bpd": 1e-4, "vdm/diffusion_bpd": 1.0 / step})
            row["vdm/bits_per_dim"] = row["vdm/recon_bpd"] + row["vdm/prior_bpd"] + row["vdm/diffusion_bpd"]
        if gan:
            row.update({"d/d_real": 0.7, "d/d_fake": 0.3, "d/loss": 1.2, "g/loss": 0.9,
                        "d/js_estimate": 0.1, "d/wasserstein_estimate": None})
        row.update({"vdm/lr": 1e-3, "vdm/grad_norm": 2.0, "train/bad_steps": 0, "perf/samples_per_s": 100.0 + step, "phys/energy_per_spin": -1.5,
                    "phys/energy_per_spin_ref": -1.6})
        lines.append(row)
        if step % 10 == 0:
            lines.append({"event": "checkpoint", "step": step, "time": 0.0, "path": "x", "seconds": 0.1})
            if vdm:
                lines.append({"event": "profile", "name": "vdm/loss_vs_t", "step": step, "time": 0.0,
                              "t": [0.25, 0.75], "mean": [1.0 / step, None], "std": [None, None], "count": [3, 0]})
    run.mkdir(parents=True)
    text = "".join(json.dumps(d) + "\n" for d in lines) + '{"step": 21, "ti'  # torn last line
    (run / "metrics.jsonl").write_text(text)
    rng = np.random.default_rng(0)
    save_grid_png(rng.choice([-1.0, 1.0], size=(4, 6, 6)), run / "samples" / "samples-0000010.png")
    save_grid_png(np.ones((9, 6, 6)), run / "samples" / "samples-0000020.png")


def test_read_metrics_splits_rows_events_profiles(tmp_path):
    _write_run(tmp_path / "run")
    log = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _ in log.series["vdm/bits_per_dim"]] == list(range(1, 21))
    assert "d/wasserstein_estimate" not in log.series  # all null
    assert [e["event"] for e in log.events] == ["start", "checkpoint", "checkpoint"]
    assert len(log.profiles) == 2 and log.num_bad_lines == 1


def test_report_writes_pngs_and_a_json_summary(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run)
    assert main(["report", "--run", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    names = sorted(p.rsplit("/", 1)[-1] for p in summary["written"])
    assert names == ["elbo.png", "gan_balance.png", "latest_samples.png", "physics.png", "t_profile.png",
                     "throughput.png", "training.png"]
    assert out[:-1] == summary["written"]
    for p in summary["written"]:
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert p.endswith("latest_samples.png") or min(im.size) > 100  # a real figure, not a stub
    # The latest grid is the step-20 one (9 tiles -> 3x3 of 6 px + 1 px padding = 22 px).
    with Image.open(run / "report" / "latest_samples.png") as im:
        assert im.size == (22, 22)


def test_report_only_draws_what_was_logged(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, vdm=False)
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "out")]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"]
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert "gan_balance.png" in names and "elbo.png" not in names and "t_profile.png" not in names
    assert all(p.startswith(str(tmp_path / "out")) for p in written)


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "has no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("garbage\n")), "holds no metrics"),
])
def test_bad_input_is_a_clear_error_exit_2(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipeline report: error:") and message in err
