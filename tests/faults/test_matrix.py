"""The fault matrix (issue 15): every bad input and every damaged file of the issue, one row
each, driven through the real CLI. Each row asserts the exit code, the message (and that no
traceback reached the user), and that what existed before is still there byte for byte while
nothing new appeared where a failed command must not write (``watch``).

Process-level faults that need a running 2-process job (a rank SIGKILLed or hung, SIGTERM to
the whole process group, SIGUSR1, NaN/Inf steps, a 2 -> 1 -> 2 world-size resume) keep their
tests in tests/integration (test_faults.py, test_sigterm_group.py, test_exact_resume.py,
test_nothing_silent.py); docs/reliability.md lists every case with the test that shows it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.faults.runs import (
    GAN, TOKEN, VDM, Fixtures, Result, build_fixtures, copy_run, damaged_members_tar, in_process, launched,
    subprocess_run, tree,
)

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("fault_matrix")]

Paths = Callable[[Fixtures, Path], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    issue_item: str  # where the issue names it ("10", "14", "fault": already worked before)
    argv: Paths  # the command line, from the session's fixtures and this row's tmp dir
    rc: int
    says: tuple[str, ...]  # in stderr + stdout
    watch: Callable[[Fixtures, Path], list[Path]] = lambda f, tmp: [tmp / "run"]  # unchanged by the command
    run: Callable[..., Result] = in_process
    setup: Callable[[Fixtures, Path], None] | None = None
    check: Callable[[Fixtures, Path, Result], None] | None = None


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def _resumed(tmp: Path) -> Path:
    return tmp / "resumed"


def _copy_vdm(f: Fixtures, tmp: Path) -> None:
    copy_run(f.vdm_run, _resumed(tmp))


def _then(*steps: Callable[[Fixtures, Path], None]) -> Callable[[Fixtures, Path], None]:
    def setup(f: Fixtures, tmp: Path) -> None:
        for s in steps:
            s(f, tmp)
    return setup


def _damage_two_checkpoints(f: Fixtures, tmp: Path) -> None:
    """Step 6 (latest) truncated mid-file, step 4's manifest garbage: step 2 is the newest valid."""
    p = _ckpt(_resumed(tmp), 6) / "ddp-vdm" / "__0_0.distcp"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    (_ckpt(_resumed(tmp), 4) / "manifest.json").write_text("garbage{")


def _flip_every_model(f: Fixtures, tmp: Path) -> None:
    for step in (2, 4, 6):
        p = _ckpt(_resumed(tmp), step) / "ddp-vdm" / "__0_0.distcp"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))


def _crash_leftovers(f: Fixtures, tmp: Path) -> None:
    """What crashes leave: SIGKILL during the save of step 8 (a .partial- directory holding
    part of the files), a crash between the checkpoint of step 6 and its export (no export/),
    and a lost `latest` pointer."""
    run = _resumed(tmp)
    partial = run / "checkpoints" / ".partial-step-00000008"
    shutil.copytree(_ckpt(run, 6), partial)
    (partial / "manifest.json").unlink()
    (partial / "ddp-vdm" / "__0_0.distcp").write_bytes(b"half a")
    shutil.copytree(run / "export", tmp / "export-before")
    shutil.rmtree(run / "export")
    (run / "checkpoints" / "latest").unlink()


def _bad_manifest(text: str) -> Callable[[Fixtures, Path], None]:
    def setup(f: Fixtures, tmp: Path) -> None:
        shutil.copytree(f.gmm, tmp / "data")
        (tmp / "data" / "manifest.json").write_text(text)
    return setup


def _forget_marker(f: Fixtures, tmp: Path) -> None:
    f.pipe_marker.unlink(missing_ok=True)


def _resume(*extra: str) -> Paths:
    return lambda f, tmp: ["train", *VDM, f"run.dir={_resumed(tmp)}", f"data.train_urls={f.classes}",
                           "data.label_key=cls", *extra]


def _train(base: list[str], data: Callable[[Fixtures, Path], Path], *extra: str) -> Paths:
    return lambda f, tmp: ["train", *base, f"run.dir={tmp / 'run'}", f"data.train_urls={data(f, tmp)}",
                           "train.num_steps=2", *extra]


def _sample(run: Callable[[Fixtures], Path], *extra: str) -> Paths:
    return lambda f, tmp: ["sample", "--run", str(run(f)), "--num-samples", "4", "--out", str(tmp / "s.npy"), *extra]


GMM = lambda f, tmp: f.gmm  # noqa: E731


def _odd_fields(f: Fixtures, tmp: Path) -> Path:
    """16 single-channel 5 x 6 fields (an odd size) as a shard set in this row's tmp dir."""
    import numpy as np

    np.save(tmp / "odd-x.npy", np.random.default_rng(0).normal(size=(16, 1, 5, 6)).astype(np.float32))
    r = in_process("shards", "npy", "--x", str(tmp / "odd-x.npy"), "--out", str(tmp / "odd"), "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    return tmp / "odd"
VDM_RUN = lambda f: f.vdm_run  # noqa: E731
GAN_RUN = lambda f: f.gan_run  # noqa: E731
SAMPLE_OUT = lambda f, tmp: [tmp / "s.npy", tmp / "s.png", f.vdm_run, f.gan_run]  # noqa: E731
CKPTS = lambda f, tmp: [_resumed(tmp) / "checkpoints"]  # noqa: E731


def _corrupt_count(metrics: Path) -> int:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max(int(r["data/corrupt_samples"]) for r in rows if "data/corrupt_samples" in r)


def _check_damaged_members(f: Fixtures, tmp: Path, r: Result) -> None:
    # 16 slots (2 steps x 8) = one epoch of the 16-sample tar: each of the 4 damaged ones once.
    assert _corrupt_count(tmp / "run" / "metrics.jsonl") == 4


def _check_fell_back_to_2(f: Fixtures, tmp: Path, r: Result) -> None:
    from pipeline.train.checkpoint import validate

    assert "resumed from step 2 (2)" in r.stdout
    assert [validate(_ckpt(_resumed(tmp), s))["step"] for s in (2, 8)] == [2, 8]


def _check_crash_leftovers(f: Fixtures, tmp: Path, r: Result) -> None:
    # Resumed from the newest valid checkpoint (6 = train.num_steps: nothing to train), the
    # partial removed, the export rewritten: byte for byte the one the run wrote at step 6
    # (the EMA weights of that checkpoint), which the setup kept aside as the reference.
    assert "resumed from step 6 (6)" in r.stdout
    assert not list((_resumed(tmp) / "checkpoints").glob(".partial-*"))
    before, after = tmp / "export-before", _resumed(tmp) / "export"
    assert json.loads((after / "export.json").read_text())["step"] == 6
    assert (after / "weights.safetensors").read_bytes() == (before / "weights.safetensors").read_bytes()


def _check_once_from_rank_0(f: Fixtures, tmp: Path, r: Result) -> None:
    log = r.stderr + r.stdout
    assert log.count("pipeline train: error: gan.conditional=true") == 1, log[-4000:]
    # Both ranks exited 2; the message came before the launcher's summary, rank 0 first.
    assert log.count("exitcode  : 2") == 2, log[-4000:]
    assert log.index("pipeline train: error:") < log.index("ChildFailedError")
    assert "Root Cause (first observed failure):\n[0]:\n" in log and "rank      : 0 (local_rank: 0)" in log


def _check_not_run(f: Fixtures, tmp: Path, r: Result) -> None:
    assert not f.pipe_marker.exists(), "the pipe: command stored in the run was executed"


def _check_evaluated_on_the_runs_data(f: Fixtures, tmp: Path, r: Result) -> None:
    assert json.loads(r.stdout.strip().splitlines()[-1])["data"] == str(f.classes)


def _check_warned_and_sampled(f: Fixtures, tmp: Path, r: Result) -> None:
    import numpy as np

    assert np.load(tmp / "s.npy").shape == (4, 2)


CASES = [
    # ---- item 5: a key the objective does not read
    Case("train.lr-on-a-gan", "5", _train(GAN, GMM, "train.lr=0.5"), 2,
         ("objective=gan does not read", "train.lr (a GAN's learning rates are gan.lr_d and gan.lr_g)")),
    Case("vdm-key-on-a-gan", "5", _train(GAN, GMM, "vdm.channels=8"), 2,
         ("vdm.channels (the vdm section is read only with objective=vdm",)),
    Case("gan-key-on-a-vdm", "5", _train(VDM, GMM, "gan.lr_d=0.1"), 2, ("gan.lr_d (the gan section",)),
    # ---- item 6
    Case("empty-run.dir", "6", lambda f, tmp: ["train", *VDM, "run.dir=", f"data.train_urls={f.gmm}",
                                                "train.num_steps=2"], 2, ("run.dir='' is empty",)),
    # ---- item 10: clear, early errors
    Case("gan.conditional-on-unlabelled-data", "10", _train(GAN, GMM, "gan.conditional=true"), 2,
         ("gan.conditional=true but the data has no labels (its manifest says label_kind='none')",)),
    Case("unet-on-vectors", "10", _train(VDM, GMM, "vdm.architecture=unet"), 2,
         ("vdm.architecture=unet needs samples [C, L], [C, H, W] or [C, D, H, W]", "got (2,)")),
    Case("periodic-unet-on-odd-sizes", "17", _train(VDM, _odd_fields, "vdm.architecture=unet"), 2,
         ("vdm.architecture=unet with vdm.periodic=true (circular padding) needs even spatial sizes",
          "got (1, 5, 6)", "set vdm.periodic=false (zero padding takes any size)")),
    Case("spectral-skip-on-non-periodic-data", "17", _train(VDM, _odd_fields, "vdm.skip=spectral"), 2,
         ("vdm.skip=spectral is the denoiser of a stationary field on a periodic grid",
          "sample shape (1, 5, 6), boundary None; use vdm.skip=gaussian (or none)")),
    Case("discrete-skip-on-continuous-data", "19", _train(VDM, GMM, "vdm.skip=discrete"), 2,
         ("vdm.skip=discrete is the denoiser of values on a finite set of levels",
          "data_kind 'continuous': use vdm.skip=gaussian")),
    Case("gan-conv-on-odd-sizes", "10", _train(GAN, _odd_fields, "gan.arch=conv"), 2,
         ("gan.channels=", "stride-2 stages, which need every spatial size divisible by",
          "the data's samples are (1, 5, 6): no number of stages fits: use gan.arch=mlp")),
    Case("unet-levels-on-vectors", "10", _train(VDM, GMM, "vdm.unet_levels=2"), 2,
         ("vdm.unet_levels=2 applies to the UNet; samples (2,) get the MLP", "leave vdm.unet_levels at 1")),
    Case("spin-grid-on-continuous-data", "19", _train(VDM, GMM, "vdm.num_timesteps=0", "vdm.sample_grid=spin-variance"), 2,
         ("vdm.sample_grid=spin-variance places the noise levels by the posterior variance of a +-1 spin",
          "data_kind 'continuous': use time or logsnr")),
    Case("gan-sign-symmetric-critic-without-the-generator", "17", _train(GAN, GMM, "gan.d_sign_symmetric=true"), 2,
         ("gan.d_sign_symmetric=true needs gan.g_sign_symmetric=true",)),
    Case("vdm-mlp-narrower-than-its-samples-warns", "17", _train(VDM, GMM, "vdm.mlp_hidden=1"), 0,
         ("warning: vdm.mlp_hidden=1 is narrower than the samples' 2 values", "set vdm.skip=gaussian"),
         watch=lambda f, tmp: []),
    Case("spin-grid-in-discrete-time", "19", _train(VDM, GMM, "vdm.sample_grid=spin-variance"), 2,
         ("vdm.sample_grid=spin-variance needs continuous time (vdm.num_timesteps=0)",)),
    Case("label-fraction-transform-on-unlabelled-data", "10", _train(VDM, GMM, "vdm.data_transform=log-label-fraction"),
         2, ("vdm.data_transform=log-label-fraction divides each sample by its continuous label",
             "label_kind 'none'; use vdm.data_transform=none")),
    Case("manifest-not-json", "10", _train(VDM, lambda f, tmp: tmp / "data"), 2,
         ("manifest.json is not valid JSON",), setup=_bad_manifest("garbage{"),
         watch=lambda f, tmp: [tmp / "run", tmp / "data"]),
    Case("manifest-missing-fields", "10", _train(VDM, lambda f, tmp: tmp / "data"), 2,
         ("manifest.json lacks the field(s) meta, shards",),
         setup=_bad_manifest('{"format": "pipeline-webdataset-shards/1"}'),
         watch=lambda f, tmp: [tmp / "run", tmp / "data"]),
    Case("manifest-bad-meta", "10", _train(VDM, lambda f, tmp: tmp / "data"), 2,
         ("'meta' is not a valid data description",),
         setup=_bad_manifest('{"format": "pipeline-webdataset-shards/1", "meta": {"sample_shape": [2]}, '
                             '"shards": []}'),
         watch=lambda f, tmp: [tmp / "run", tmp / "data"]),
    Case("sample-num-steps-0-on-a-vdm", "10", _sample(VDM_RUN, "--num-steps", "0"), 2,
         ("--num-steps must be >= 1",), watch=SAMPLE_OUT),
    Case("sample-num-steps-on-a-gan", "10", _sample(GAN_RUN, "--num-steps", "5"), 2,
         ("--num-steps applies to VDM samplers",), watch=SAMPLE_OUT),
    Case("sample-png-of-vectors", "10", lambda f, tmp: [*_sample(VDM_RUN)(f, tmp), "--png", str(tmp / "s.png")], 2,
         ("--png draws samples of shape [H, W], [1, H, W] or [1, D, H, W]", "shape (2,)"), watch=SAMPLE_OUT),
    Case("shards-hf-missing-path", "10",
         lambda f, tmp: ["shards", "hf", "--path", str(tmp / "nonexistent"), "--x-column", "x",
                         "--out", str(tmp / "out")], 2,
         ("does not exist (a local path: it is not looked up on the hub",), watch=lambda f, tmp: [tmp / "out"]),
    Case("report-out-unwritable", "10", lambda f, tmp: ["report", "--run", str(f.vdm_run), "--out", "/proc/nope"], 2,
         ("cannot create the output directory '/proc/nope'",), watch=lambda f, tmp: [f.vdm_run]),
    Case("report-eval-not-a-result", "17",
         lambda f, tmp: ["report", "--run", str(f.vdm_run), "--out", str(tmp / "rep"), "--eval",
                         str(f.vdm_run / "config.yaml")], 2,
         ("holds no `pipeline evaluate` result",), watch=lambda f, tmp: [f.vdm_run, tmp / "rep"]),
    Case("two-processes-say-it-once", "10", _train(GAN, GMM, "gan.conditional=true"), 1,
         ("gan.conditional=true but the data has no labels",), run=launched, check=_check_once_from_rank_0),
    # ---- item 11
    Case("misspelt-label-key", "11", _train(VDM, lambda f, tmp: f.classes, "data.label_key=clss"), 2,
         ("data.label_key='clss'", "'cls'")),
    Case("labelled-data-without-label-key", "10", _train(VDM, lambda f, tmp: f.classes), 2,
         ("data.label_key is not set", "label_kind='class'", "('cls', ")),
    # ---- issue 18: asynchronous checkpoints exist for DDP and FSDP only
    Case("async-checkpoint-on-deepspeed", "18",
         _train(VDM, GMM, "engine.backend=deepspeed", "train.async_checkpoint=true"), 2,
         ("train.async_checkpoint=true needs engine.backend=accelerate", "engine.backend='deepspeed'")),
    # ---- item 8: a pipe: command stored in a run is never run by the commands that read it
    Case("evaluate-does-not-run-a-stored-pipe", "8",
         lambda f, tmp: ["evaluate", "--run", str(f.pipe_run), "--num-samples", "4"], 2,
         ("the run's data.train_urls is a pipe: command", "pass --data"), setup=_forget_marker,
         check=_check_not_run, watch=lambda f, tmp: [f.pipe_run]),
    Case("evaluate-defaults-to-the-runs-own-data", "14",
         lambda f, tmp: ["evaluate", "--run", str(f.vdm_run), "--num-samples", "4", "--elbo-num-samples", "0"], 0,
         ("evaluated ",), watch=lambda f, tmp: [f.vdm_run], check=_check_evaluated_on_the_runs_data),
    Case("bench-variance-does-not-run-a-stored-pipe", "8",
         lambda f, tmp: ["bench", "variance", "--run", str(f.pipe_run)], 2,
         ("the run's data.train_urls is a pipe: command", "pass --data"), setup=_forget_marker,
         check=_check_not_run, watch=lambda f, tmp: [f.pipe_run]),
    # ---- item 14: the smaller ones
    Case("sample-missing-run-dir", "14", _sample(lambda f: f.root / "no-such-run"), 2,
         ("no such run directory",), watch=SAMPLE_OUT),
    Case("sample-fractional-class", "14", _sample(VDM_RUN, "--label", "2.5"), 2,
         ("labels [2.5] are not class indices; allowed: integers 0..2",), watch=SAMPLE_OUT),
    Case("sample-label-outside-the-trained-range", "14", _sample(GAN_RUN, "--label", "9.0"), 0,
         ("warning: labels [9.0] lie outside the labels the model was trained on (1.8..3",),
         watch=lambda f, tmp: [f.gan_run], check=_check_warned_and_sampled),
    Case("resume-past-the-end", "14", _resume("train.num_steps=2"), 2,
         ("holds checkpoints up to step 6, beyond train.num_steps=2",), setup=_copy_vdm,
         watch=lambda f, tmp: [_resumed(tmp)]),
    Case("shards-rerun-other-parameters", "14",
         lambda f, tmp: ["shards", "gmm", "--dim", "2", "--num-components", "3", "--num-samples", "64",
                         "--out", str(f.gmm), "--val-fraction", "0"], 2,
         ("written with other parameters (num_samples: 128 -> 64)",), watch=lambda f, tmp: [f.gmm]),
    # ---- faults that already worked, now through the CLI
    Case("damaged-shard-members", "fault",
         lambda f, tmp: ["train", *VDM, f"run.dir={tmp / 'run'}", f"data.train_urls={damaged_members_tar(tmp)}",
                         "train.num_steps=2"], 0, ("inferred",), run=subprocess_run, watch=lambda f, tmp: [],
         check=_check_damaged_members),
    Case("damaged-checkpoints-fall-back", "fault", _resume("train.num_steps=8"), 0,
         ("checkpoint: skipping step-00000006", "checkpoint: skipping step-00000004"), run=subprocess_run,
         setup=_then(_copy_vdm, _damage_two_checkpoints), watch=lambda f, tmp: [], check=_check_fell_back_to_2),
    Case("every-checkpoint-damaged", "2", _resume("train.num_steps=8"), 2,
         ("none validates", "  step-00000002: ", "  step-00000004: ", "  step-00000006: ", "checksum does not match",
          "fresh run.dir"),
         run=subprocess_run, setup=_then(_copy_vdm, _flip_every_model), watch=CKPTS),
    Case("crash-leftovers", "14", _resume("train.num_steps=6"), 0,
         ("checkpoint: removing .partial-step-00000008", "checkpoint: no latest file",
          "export: missing or not of step 6; rewriting it", "the run is finished, nothing to train"),
         run=subprocess_run, setup=_then(_copy_vdm, _crash_leftovers), watch=lambda f, tmp: [],
         check=_check_crash_leftovers),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Fixtures:
    return build_fixtures(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, fixtures: Fixtures, tmp_path: Path):
    if case.setup is not None:
        case.setup(fixtures, tmp_path)
    watched = case.watch(fixtures, tmp_path)
    before = [tree(p) for p in watched]
    r = case.run(*case.argv(fixtures, tmp_path))
    log = r.stderr + r.stdout
    assert r.returncode == case.rc, log[-4000:]
    for needle in case.says:
        assert needle in log, (needle, log[-4000:])
    if case.run is not launched:  # the launcher's own summary is a traceback of torch's
        assert "Traceback" not in log, log[-4000:]
    assert [tree(p) for p in watched] == before, "the command changed, added or removed files it must not touch"
    if case.check is not None:
        case.check(fixtures, tmp_path, r)


def test_a_credential_in_a_config_value_is_redacted_from_every_run_file(fixtures: Fixtures):
    """The pipe: run's data.train_urls held an expanded token (issue 15 item 8)."""
    assert "warning: data.train_urls hold(s) a credential; it is redacted in config.yaml" in fixtures.pipe_train_log
    files = [p for p in fixtures.pipe_run.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl")]
    names = {p.name for p in files}
    assert {"config.yaml", "export.json", "metrics.jsonl", "track.json"} <= names, names
    for p in files:
        assert TOKEN not in p.read_text(errors="replace"), p
    assert "HF_TOKEN=<redacted> sh -c" in (fixtures.pipe_run / "config.yaml").read_text()
    # The redacted config is what a resume compares against: resuming is no config change.
    from pipeline.config import flat_config, load_config, read_saved_config

    pipe = f"pipe:HF_TOKEN={TOKEN} sh -c 'touch {fixtures.pipe_marker}; cat {fixtures.gmm}/train-000000.tar'"
    cfg = load_config("configs/quickstart.yaml", [a for a in VDM if "=" in a] + [
        f"run.dir={fixtures.pipe_run}", f"data.train_urls={pipe}", "train.num_steps=2"])
    assert read_saved_config(fixtures.pipe_run / "config.yaml") == flat_config(cfg)
