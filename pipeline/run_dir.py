"""The layout of a run directory, in one place.

Every file a run writes lives under ``run.dir``::

    config.yaml          the resolved config that produced the checkpoints
    checkpoints/         atomic checkpoints (layout: :mod:`pipeline.train.checkpoint`)
    export/              EMA weights + config + data meta (:mod:`pipeline.train.export`)
    metrics.jsonl        scalars and events, one JSON object a line (:mod:`pipeline.track.tracker`)
    track.json           W&B run id, last logged step, one entry per (re)start
    preempted.json       written once a preemption checkpoint is complete (launch/requeue_exit.sh,
                         slurm/train.sbatch turn it into exit code 75)
    samples/             sample grids (PNG)
    wandb/               W&B's own files
    report/              `pipeline report` plots
    eval/                `pipeline evaluate` caches (e.g. the digits feature net)

Code that reads or writes any of these goes through :class:`RunDir` instead of spelling the
names out, so the layout can be read (and changed) here alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; builds names only, touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def export_partial(self) -> Path:
        """Where a new export is written before it is swapped in (see ``write_export``)."""
        return self.root / ".export.partial"

    @property
    def export_old(self) -> Path:
        """Where the previous export waits during the swap."""
        return self.root / ".export.old"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def track_state(self) -> Path:
        return self.root / "track.json"

    @property
    def preempted(self) -> Path:
        return self.root / "preempted.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def eval_cache(self) -> Path:
        return self.root / "eval"
