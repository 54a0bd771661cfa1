"""What the data benches (:mod:`pipeline.bench.data`, :mod:`pipeline.bench.data_scale`) share:
an S3 API server on loopback, the load average printed beside every figure, and the real
training step of a preset, the consumer a data stream is measured against."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def loopback_s3():
    """An S3 API server (moto) in a process of its own on a free 127.0.0.1 port, with the
    AWS_* variables pointing at it while the block runs; yields its endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                             "AWS_DEFAULT_REGION")}
    try:
        deadline = time.monotonic() + 60
        while True:  # listening yet?
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.2)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_DEFAULT_REGION="us-east-1")
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def preset_step_rate(config: str, shards: Path, run_dir: Path, *, num_steps: int, threads: int,
                     overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Samples/s of the real training step of preset ``config`` fed ``shards``: ``pipeline
    train`` in a fresh process with ``threads`` OpenMP threads, timed by the loop itself (the
    median ``perf/step_time_s`` of the logging intervals after the first, one step each)."""
    from pipeline.bench.train import run_train

    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory left by a last bench would resume
    before = load_avg()
    r = run_train(run_dir, Path(config), shards, [
        f"train.num_steps={num_steps}", "train.warmup_steps=0", "train.log_every_steps=1",
        f"train.checkpoint_every_steps={num_steps + 1}", "train.num_sample_images=1", "track.wandb=off",
        "track.progress_bar=false", *overrides], num_processes=1, threads=threads)
    return {"preset": str(config), "samples_per_s": r["samples_per_s"], "step_time_s": r["step_time_s"],
            "num_steps": num_steps, "threads": threads, "overrides": list(overrides), "load_avg": [before, load_avg()]}


def load_avg() -> float:
    """The 1-minute load average (the figures are only comparable at a similar load)."""
    return round(os.getloadavg()[0], 2)
