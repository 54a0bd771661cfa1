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


def test_report_plots_an_evaluation_result(tmp_path, capsys):
    """--eval: a GRF result (true 2D fields through the evaluator) draws the spectrum ratio and
    the Minkowski functionals; a calorimeter result its profile ratios; the evaluation's last
    stdout line is read as the --out JSON is."""
    from pipeline.eval.calo import compare_calo
    from pipeline.eval.grf import evaluate_grf
    from pipeline.eval.run import json_safe
    from pipeline.physics import calo
    from pipeline.physics.grf import GRF, PowerLaw

    run = tmp_path / "run"
    _write_run(run)
    f = GRF(2, 16, PowerLaw(-2.0))
    rng = np.random.default_rng(0)
    grf_result = json_safe({"evaluation": "grf", **evaluate_grf(f.sample(64, rng), f, reference=f.sample(64, rng))})
    (tmp_path / "grf.log").write_text("sampling...\n" + json.dumps(grf_result) + "\n")  # saved stdout
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "a"), "--eval", str(tmp_path / "grf.log")]) == 0
    names = {p.rsplit("/", 1)[-1] for p in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"]}
    assert {"eval_spectrum.png", "eval_minkowski.png"} <= names and "eval_profiles.png" not in names
    with Image.open(tmp_path / "a" / "eval_minkowski.png") as im:
        assert min(im.size) > 300

    g = calo.CaloGeometry(num_layers=6, num_alpha=2, num_radial=3)
    e = calo.sample_energies(50, 1e3, 1e4, rng)
    calo_result = json_safe({"evaluation": "calo", **compare_calo(calo.simulate(e, g, calo.CaloMaterial(), rng), e, g,
                                                                  calo.CaloMaterial())})
    (tmp_path / "calo.json").write_text(json.dumps(calo_result, indent=1))  # --out's form
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "b"), "--eval", str(tmp_path / "calo.json")]) == 0
    names = {p.rsplit("/", 1)[-1] for p in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"]}
    assert "eval_profiles.png" in names and "eval_spectrum.png" not in names


@pytest.mark.parametrize("content, message", [(None, "is not a file"), ('{"a": 1}\n', "holds no `pipeline evaluate`")])
def test_a_bad_eval_file_is_exit_2_before_anything_is_written(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    _write_run(run)
    path = tmp_path / "e.json"
    if content is not None:
        path.write_text(content)
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "out"), "--eval", str(path)]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
