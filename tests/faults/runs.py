"""What the fault matrix works on: tiny shard sets and runs written once per session by the
real CLI, a snapshot of a directory tree (to show that nothing was lost or added), and the
two ways a row drives the CLI.

In process: :func:`pipeline.cli.main`, the function the `pipeline` entry point runs (exit code
returned, stderr captured), for rows that stop before training starts; a subprocess costs
~4 s of torch import each on the shared CPUs. Subprocess (`python -m pipeline`, or a real
`accelerate launch` with 2 gloo processes): for every row that trains, resumes or launches.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.conftest import accelerate_launch, run_pipeline

# A tiny VDM / GAN, 8 samples per step, no workers, no W&B: seconds per run.
TINY = ["train.warmup_steps=0", "train.checkpoint_every_steps=2", "train.keep_last_checkpoints=10",
        "train.log_every_steps=1", "data.batch_per_rank=8", "data.num_workers=0", "track.wandb=off",
        "track.progress_bar=false", "train.num_sample_images=4"]
VDM = ["--config", "configs/quickstart.yaml", "vdm.data_kind=auto", "vdm.num_timesteps=4", "vdm.mlp_hidden=8",
       "vdm.emb_dim=8", *TINY]
GAN = ["--config", "configs/gan_gmm.yaml", "gan.n_critic=1", "gan.channels=[8,8]", "gan.latent_dim=4", *TINY]
TOKEN = "hf_" + "q" * 30  # the shape of a Hugging Face token; what an expanded $HF_TOKEN looks like


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def in_process(*argv: str) -> Result:
    """``pipeline ARGV`` through :func:`pipeline.cli.main` in this process."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return Result(rc, out.getvalue(), err.getvalue())


def subprocess_run(*argv: str) -> Result:
    r = run_pipeline(*argv, check=False)
    return Result(r.returncode, r.stdout, r.stderr)


def launched(*argv: str) -> Result:
    r = accelerate_launch(2, *argv, check=False)
    return Result(r.returncode, r.stdout, r.stderr)


def tree(path: Path) -> dict[str, str] | None:
    """Every file and directory under ``path`` with a sha256 of each file (None: no ``path``)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


# ------------------------------------------------------------------------------ data and runs


def write_points(root: Path, name: str, labels: np.ndarray | None, *extra: str) -> Path:
    """96 2-D points (seeded) as a shard set, with ``labels`` when given."""
    rng = np.random.default_rng(0)
    np.save(root / f"{name}-x.npy", rng.normal(size=(96, 2)).astype(np.float32))
    args = ["shards", "npy", "--x", str(root / f"{name}-x.npy"), "--out", str(root / name), "--val-fraction", "0"]
    if labels is not None:
        np.save(root / f"{name}-labels.npy", labels)
        args += ["--labels", str(root / f"{name}-labels.npy")]
    r = in_process(*args, *extra)
    assert r.returncode == 0, r.stderr
    return root / name


@dataclass
class Fixtures:
    root: Path
    gmm: Path  # unlabelled 2-D points
    classes: Path  # 2-D points with 3 classes
    temperatures: Path  # 2-D points with continuous labels 1.8, 2.2, 3.0
    vdm_run: Path  # class-conditional VDM on `classes`, 6 steps, checkpoints at 2, 4 and 6
    gan_run: Path  # conditional GAN on `temperatures`, 2 steps
    pipe_run: Path  # VDM whose data.train_urls is a pipe: command holding TOKEN
    pipe_marker: Path  # the file that pipe: command touches each time it runs
    pipe_train_log: str  # what `pipeline train` of pipe_run printed on stderr


def build_fixtures(root: Path) -> Fixtures:
    gmm = root / "gmm"
    assert in_process("shards", "gmm", "--dim", "2", "--num-components", "3", "--num-samples", "128",
                      "--out", str(gmm), "--val-fraction", "0").returncode == 0
    classes = write_points(root, "classes", np.arange(96, dtype=np.int64) % 3)
    temperatures = write_points(root, "temperatures", np.array([1.8, 2.2, 3.0] * 32, dtype=np.float32),
                                "--label-kind", "continuous")
    vdm_run, gan_run, pipe_run, marker = root / "vdm", root / "gan", root / "pipe", root / "pipe-ran"
    run_pipeline("train", *VDM, f"run.dir={vdm_run}", f"data.train_urls={classes}", "data.label_key=cls",
                 "train.num_steps=6")
    run_pipeline("train", *GAN, f"run.dir={gan_run}", f"data.train_urls={temperatures}", "gan.conditional=true",
                 "data.label_key=label", "train.num_steps=2")
    pipe = f"pipe:HF_TOKEN={TOKEN} sh -c 'touch {marker}; cat {gmm}/train-000000.tar'"
    log = run_pipeline("train", *VDM, f"run.dir={pipe_run}", f"data.train_urls={pipe}", "train.num_steps=2").stderr
    return Fixtures(root, gmm, classes, temperatures, vdm_run, gan_run, pipe_run, marker, log)


def damaged_members_tar(root: Path) -> Path:
    """A tar of 16 samples of which 4 are damaged (not .npy, an object array, no npy member,
    a wrong shape): 16 slots, so one epoch of 2 steps x 8 meets each damaged one once."""
    import json

    import webdataset as wds

    path = root / "damaged.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(16):
            s = {"__key__": f"{i:04d}", "json": json.dumps({"index": i}).encode()}
            buf = io.BytesIO()
            if i == 3:
                s["npy"] = b"this is not an npy file"
            elif i == 7:
                np.save(buf, np.array([object()] * 2, dtype=object), allow_pickle=True)
                s["npy"] = buf.getvalue()
            elif i == 11:
                pass  # no npy member at all
            else:
                np.save(buf, np.full((4,) if i == 13 else (2,), i, dtype=np.float32))
                s["npy"] = buf.getvalue()
            w.write(s)
    return path

