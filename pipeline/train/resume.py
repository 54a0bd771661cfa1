"""May a new config continue the checkpoints already in its run directory? (issue 15 item 3)

Starting `pipeline train` with a ``run.dir`` that holds checkpoints resumes them. Before
anything is written (``config.yaml`` keeps the config that produced the checkpoints until the
resume is accepted), the new config is compared key by key with the run's saved
``config.yaml``, and the data's metadata with the export's:

* error: the objective, and the keys of its section that shape the model or define the loss
  (``vdm.channels``, ``gan.arch``, ``vdm.schedule``, ...), and the data's shape and kind. A
  resume would either fail inside ``load_state_dict`` with a raw traceback or continue a
  different model than the one trained so far.
* warning: keys that change the data order or the optimisation (``train.lr``,
  ``data.batch_per_rank``, ``run.seed``, ``gan.lr_d``, ...). Allowed (e.g. fine-tuning at a
  lower learning rate), but the steps after the resume no longer continue the same
  trajectory, so each such key is named.
* silent: :data:`pipeline.config.RESUME_SILENT_KEYS` (run length, logging, sampling and
  checkpoint cadence, tracking, where the run lives), the section of the objective the
  run does not use, and the keys of its own section that do not act on the model for this
  data (the MLP's widths under the UNet: ``inert_keys``; `pipeline train` names them when set).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, flat_config, is_resume_silent, read_saved_config
from pipeline.data.meta import DataMeta
from pipeline.errors import ConfigError
from pipeline.objectives.registry import inert_settings
from pipeline.run_dir import RunDir
from pipeline.train.export import EXPORT_INFO

# Keys of the objective's own section that tune the optimisation or weight a loss term, but
# leave every parameter's shape and what the model is as they are. Every other key of the
# section (architecture, widths, schedule, time discretisation, loss family, ...) is an error.
TUNABLE_OBJECTIVE_KEYS = frozenset({
    "vdm.importance_uniform_mix",
    "gan.n_critic", "gan.lr_g", "gan.lr_d", "gan.betas", "gan.gp_weight", "gan.r1_weight",
    "gan.g_observable_matching", "gan.labelled_fraction", "gan.heldout_fraction",
})
# DataMeta fields whose change changes the model's input/output shapes or the data's
# likelihood (a discrete decoder for spins vs levels); label_values only adds or drops
# conditioning values and is a warning.
_SHAPE_META_FIELDS = ("sample_shape", "data_kind", "num_levels", "label_kind", "num_classes")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def has_checkpoints(run_dir: RunDir) -> bool:
    """Whether ``run_dir`` holds a checkpoint directory with a manifest (complete or not:
    a resume will look at it, so the new config must fit it)."""
    from pipeline.train.checkpoint import MANIFEST

    return run_dir.checkpoints.is_dir() and any(run_dir.checkpoints.glob(f"step-*/{MANIFEST}"))


def _check_not_past_the_end(run_dir: RunDir, num_steps: int) -> None:
    """A run whose checkpoints are beyond ``train.num_steps`` cannot be continued to it: say so
    instead of restoring, training nothing and printing where the samples would be (issue 15
    item 14). The step is read from each checkpoint's manifest (never from a directory name),
    without loading the checkpoint; an unreadable manifest is left to the restore, which names it."""
    from pipeline.train.checkpoint import MANIFEST, manifest_step

    steps = []
    for manifest in run_dir.checkpoints.glob(f"step-*/{MANIFEST}"):
        try:
            step = manifest_step(manifest.parent)
        except OSError:
            continue
        if step is not None:
            steps.append(step)
    if steps and max(steps) > num_steps:
        raise ConfigError(
            f"run.dir={run_dir.root} holds checkpoints up to step {max(steps)}, beyond train.num_steps={num_steps}: "
            f"the run is already past the end it is asked to train to. Give train.num_steps >= {max(steps)} to "
            "continue it, or a fresh run.dir"
        )


def classify(old: dict[str, Any], new: dict[str, Any], objective: str,
             inert: frozenset[str] = frozenset()) -> tuple[list[Change], list[Change]]:
    """(errors, warnings) between two flat (dotted) config dicts of a run of ``objective``.
    ``inert``: keys of the objective's section that do not act on the model for this data
    (the MLP's widths under the UNet): not compared. Both configs build the same network
    whenever they matter (otherwise ``vdm.architecture`` or the data's shape differs, an error)."""
    errors, warnings = [], []
    unused = "gan." if objective == "vdm" else "vdm."
    missing = object()
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b or key.startswith(unused) or key in inert:
            continue
        # A cosine decay (train.min_lr_ratio < 1) runs over train.num_steps: extending the run
        # stretches the schedule of the steps already taken, so that change is not silent.
        decays = new.get("train.min_lr_ratio", 1.0) != 1.0
        if is_resume_silent(key) and not (key == "train.num_steps" and decays):
            continue
        change = Change(key, None if a is missing else a, None if b is missing else b)
        is_objective = key == "objective" or (key.startswith(f"{objective}.") and key not in TUNABLE_OBJECTIVE_KEYS)
        (errors if is_objective else warnings).append(change)
    return errors, warnings


def classify_meta(old: dict[str, Any], new: DataMeta) -> tuple[list[Change], list[Change]]:
    """(errors, warnings) between the data meta of the run's export and the new data's."""
    errors, warnings = [], []
    for key, b in dataclasses.asdict(new).items():
        if key not in old:  # an export written before the field existed: nothing to compare
            continue
        a, b = old[key], list(b) if isinstance(b, tuple) else b  # JSON has lists for tuples
        if a != b:
            (errors if key in _SHAPE_META_FIELDS else warnings).append(Change(f"data meta {key}", a, b))
    return errors, warnings


# The keys that split the global batch into ranks x micro steps x samples per micro step.
_BATCH_SPLIT_KEYS = ("data.batch_per_rank", "train.grad_accum_steps")


def _same_global_batch(run_dir: RunDir, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether the global batch (world size x micro steps x batch per rank) is the one the
    newest checkpoint was trained with. An elastic resume (issue 16) that changes
    ``data.batch_per_rank`` or ``train.grad_accum_steps`` only to keep it on a new world size
    (2 x 8 -> 1 x 16) continues the same global batches sample for sample, so those keys are no
    change of the data order; the world-size change itself is said by the checkpoint module
    (``ResumeWarning``). Old world size: the newest checkpoint's manifest; new: the launcher's
    ``WORLD_SIZE`` (1 for a plain ``python``)."""
    from pipeline.train.checkpoint import LATEST, MANIFEST

    try:
        name = (run_dir.checkpoints / LATEST).read_text().strip()
        old_world_size = int(json.loads((run_dir.checkpoints / name / MANIFEST).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):  # no readable newest checkpoint: keep the warnings
        return False

    def global_batch(flat: dict[str, Any], world_size: int) -> int | None:
        batch, accum = flat.get("data.batch_per_rank"), flat.get("train.grad_accum_steps", 1)
        return None if batch is None else world_size * batch * accum

    before = global_batch(old, old_world_size)
    return before is not None and before == global_batch(new, int(os.environ.get("WORLD_SIZE", "1")))


def check_resume(cfg: Config, meta: DataMeta) -> list[str]:
    """Raise :class:`ConfigError` (naming every key, old and new value) when ``cfg`` cannot
    continue the checkpoints in ``cfg.run.dir``; return the warnings to print otherwise
    (empty for a fresh run directory). Reads only; writes nothing."""
    run_dir = RunDir(cfg.run.dir)
    if not has_checkpoints(run_dir):
        return []
    _check_not_past_the_end(run_dir, cfg.train.num_steps)
    errors: list[Change] = []
    warnings: list[Change] = []
    if run_dir.config.is_file():
        old, new = read_saved_config(run_dir.config), flat_config(cfg)
        e, w = classify(old, new, cfg.objective, frozenset(inert_settings(cfg, meta)))
        if _same_global_batch(run_dir, old, new):
            w = [c for c in w if c.key not in _BATCH_SPLIT_KEYS]
        errors += e
        warnings += w
    export_json = run_dir.export / EXPORT_INFO
    if export_json.is_file():
        e, w = classify_meta(json.loads(export_json.read_text()).get("meta") or {}, meta)
        errors += e
        warnings += w
    if errors:
        raise ConfigError(
            f"run.dir={cfg.run.dir} holds checkpoints of a different model; these keys change the model's "
            f"shapes or its objective and cannot be resumed: {'; '.join(map(str, errors))}. "
            "Use a new run.dir, or set them back to the run's values (its config.yaml is unchanged)"
        )
    if warnings:
        return [f"resuming {cfg.run.dir} with a changed data order or optimisation (the run no longer continues "
                f"the same trajectory): {'; '.join(map(str, warnings))}"]
    return []
