"""Typed configuration: one dataclass per component, YAML presets, dotted overrides.

This module holds the dataclasses, their cross-field checks, loading and saving;
:mod:`pipeline.config_parse` holds the generic reading (YAML 1.2 scalars, typed construction,
override parsing).

A preset is a YAML mapping whose sections mirror the dataclasses below
(``run``, ``data``, ``train``, ``engine``, ``track``, ``vdm``/``gan``).
Overrides on the command line are ``section.key=value``; values are parsed as YAML
scalars, so ``train.num_steps=200`` is an int and ``run.dir=/tmp/r`` a string.

Every user error (unknown key, wrong type, a value outside its allowed set, an
impossible combination) raises :class:`ConfigError`, a ``ValueError`` naming the key and
what is allowed. It is raised while parsing, before any process group starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# build, parse_overrides, flatten: re-exported (callers import them from here)
from pipeline.config_parse import build, flatten, merge, parse_overrides, yaml_load  # noqa: F401
from pipeline.errors import ConfigError  # noqa: F401  (re-exported: the config's error)
from pipeline.data.config import DataConfig
from pipeline.objectives.gan.config import GANConfig
from pipeline.objectives.vdm.config import VDMConfig


@dataclass
class RunConfig:
    dir: str  # where config, checkpoints, metrics, samples and W&B files of this run live
    seed: int = 0
    name: str | None = None  # display name (W&B); defaults to the run directory's name


@dataclass
class TrainConfig:
    num_steps: int  # optimizer steps (of the first phase) in the whole run, across resumes
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 1.0  # 1.0 = constant learning rate after warm-up
    grad_accum_steps: int = 1
    grad_clip_norm: float | None = 1.0
    ema_decay: float = 0.999
    log_every_steps: int = 10
    checkpoint_every_steps: int = 100
    keep_last_checkpoints: int = 3  # retention: newest K ...
    keep_every_steps: int | None = None  # ... plus every M-th step, kept forever
    # Write checkpoints in the background (torch.distributed.checkpoint.async_save; DDP and
    # FSDP): staged at the step, counted (manifest, `latest`) once every rank's write is done.
    async_checkpoint: bool = False
    sample_every_steps: int | None = None  # sample grids during training (None = only at the end)
    num_sample_images: int = 64
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops


@dataclass
class EngineConfig:
    # accelerate: DDP when launched with several processes, FSDP2 with fsdp=full_shard|shard_grad_op;
    # deepspeed: ZeRO stage `zero_stage`.
    backend: Literal["accelerate", "deepspeed"] = "accelerate"
    fsdp: Literal["off", "full_shard", "shard_grad_op"] = "off"
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    # DeepSpeed JSON with ZeRO tuning (bucket sizes, prefetch, overlap), e.g. launch/ds_zero3.json.
    # Batch size, accumulation, clipping, precision and offload always come from this config.
    deepspeed_config: str | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False  # torch.compile the networks (denoiser, G, D): pipeline/train/compile.py
    timeout_s: int = 120  # collective timeout: a dead rank stops the others within this


@dataclass
class TrackConfig:
    # auto: online when WANDB_API_KEY is set, offline otherwise.
    wandb: Literal["auto", "online", "offline", "off"] = "auto"
    project: str = "pipeline"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_id: str | None = None  # fixed W&B run id (SLURM: derived from the job id)
    progress_bar: bool = True


@dataclass
class Config:
    run: RunConfig
    data: DataConfig
    train: TrainConfig
    objective: Literal["vdm", "gan"] = "vdm"
    vdm: VDMConfig = field(default_factory=VDMConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        """Cross-field checks: combinations that each value alone does not rule out."""
        if not self.run.dir.strip():
            # An empty run.dir resolves to the current directory: the run's checkpoints,
            # config.yaml and metrics.jsonl would land among whatever is there (issue 15 item 6).
            raise ConfigError(f"run.dir={self.run.dir!r} is empty; give the run directory, e.g. run.dir=runs/r1")
        t = self.train
        _check_train(t)
        if t.async_checkpoint and self.engine.backend != "accelerate":
            raise ConfigError(
                f"train.async_checkpoint=true needs engine.backend=accelerate (DDP or FSDP, through "
                f"torch.distributed.checkpoint); engine.backend={self.engine.backend!r} writes its own "
                "checkpoint format synchronously: leave train.async_checkpoint=false"
            )
        if self.engine.fsdp != "off":
            if self.engine.backend != "accelerate":
                raise ConfigError(
                    f"engine.fsdp={self.engine.fsdp!r} needs engine.backend=accelerate; with DeepSpeed, "
                    "shard through engine.zero_stage (3 shards parameters too) and leave engine.fsdp=off"
                )
            if self.engine.mixed_precision == "fp16":
                # fp16 needs loss scaling, which the FSDP2 path has not got (bf16 needs none:
                # it has fp32's exponent range).
                raise ConfigError(
                    f"engine.fsdp={self.engine.fsdp!r} supports engine.mixed_precision 'no' or 'bf16', got 'fp16'; "
                    "for fp16 with loss scaling use engine.backend=deepspeed"
                )
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and self.engine.backend == "accelerate":
            # Accelerate's FSDP plugin (distributed_type FSDP) never runs on CPU-only machines and
            # would wrap the model a second time; our FSDP is selected by the training config.
            raise ConfigError(
                "the launcher enabled Accelerate's FSDP plugin (ACCELERATE_USE_FSDP, distributed_type: FSDP); "
                "launch a plain multi-process run (launch/fsdp.yaml, launch/multi_gpu.yaml) and select FSDP with "
                "engine.fsdp=full_shard or engine.fsdp=shard_grad_op"
            )
        if self.engine.deepspeed_config is not None:
            if self.engine.backend != "deepspeed":
                raise ConfigError("engine.deepspeed_config is used only with engine.backend=deepspeed")
            if not os.path.isfile(self.engine.deepspeed_config):
                raise ConfigError(f"engine.deepspeed_config={self.engine.deepspeed_config!r}: no such file")
        if self.engine.compile and self.engine.backend == "deepspeed" and self.engine.zero_stage == 3:
            raise ConfigError("engine.compile=true cannot be used with ZeRO-3 (engine.zero_stage=3), whose parameter "
                              "partitioning hooks a compiled graph bypasses; use zero_stage 1 or 2, or engine.fsdp")
        if self.engine.offload_optimizer and self.engine.backend != "deepspeed":
            raise ConfigError("engine.offload_optimizer=true needs engine.backend=deepspeed")
        self.data.validate()
        if self.objective == "vdm":
            self.vdm.validate()
        else:
            self.gan.validate()
            if self.gan.d_minibatch_std and self.data.batch_per_rank % self.gan.d_minibatch_std:
                raise ConfigError(
                    f"gan.d_minibatch_std={self.gan.d_minibatch_std} groups each rank's batch into groups of that "
                    f"many samples; data.batch_per_rank={self.data.batch_per_rank} is not a multiple of it"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of what determines the training trajectory: every key but those a resume may
        change silently (:data:`RESUME_SILENT_KEYS`: run length, cadence, tracking, where)."""
        unused = "gan." if self.objective == "vdm" else "vdm."  # the other objective's section is never read
        d = {k: v for k, v in flatten(self.to_dict()).items() if not (is_resume_silent(k) or k.startswith(unused))}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys a resume may change without a word (see pipeline/train/resume.py for the others):
# extending a run with a larger train.num_steps is the documented way to train longer; how
# often (and how) it logs, samples and checkpoints, what it keeps, what tracks it and where it lives do
# not change what it computes. Every other key changes the model, the objective, the data
# order or the optimisation.
RESUME_SILENT_KEYS = frozenset({
    "run.dir", "run.name", "train.num_steps", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_last_checkpoints", "train.keep_every_steps", "train.async_checkpoint",
    "train.sample_every_steps", "train.num_sample_images", "train.max_bad_steps", "data.verify", "engine.timeout_s",
    "vdm.sample_grid",  # where a trained model is sampled, not what it learns
})
RESUME_SILENT_SECTIONS = ("track",)


def is_resume_silent(key: str) -> bool:
    return key in RESUME_SILENT_KEYS or key.split(".", 1)[0] in RESUME_SILENT_SECTIONS


def _check_train(t: TrainConfig) -> None:
    _positive("train.num_steps", t.num_steps)
    _positive("train.grad_accum_steps", t.grad_accum_steps)
    _positive("train.log_every_steps", t.log_every_steps)
    _positive("train.checkpoint_every_steps", t.checkpoint_every_steps)
    _positive("train.keep_last_checkpoints", t.keep_last_checkpoints)
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0.0 < t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in (0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps < 0 or t.warmup_steps > t.num_steps:
        raise ConfigError(f"train.warmup_steps must be in [0, train.num_steps={t.num_steps}], got {t.warmup_steps}")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset, apply dotted overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    raw = merge(raw, parse_overrides(overrides or []))
    cfg = build(Config, raw)
    check_objective_keys(raw, cfg.objective)
    cfg.validate()
    return cfg


# Keys of shared sections that only one objective reads, with what the other one reads
# instead. A GAN has one learning rate per phase (gan.lr_d, gan.lr_g), so train.lr would be
# silently ignored (issue 15 item 5). train.betas is read by both (a GAN's default when
# gan.betas is null); warm-up, decay, clipping and weight decay apply to every phase.
OBJECTIVE_ONLY_KEYS: dict[str, tuple[str, str]] = {
    "train.lr": ("vdm", "a GAN's learning rates are gan.lr_d and gan.lr_g"),
}
OBJECTIVE_SECTIONS = ("vdm", "gan")


def check_objective_keys(raw: dict[str, Any], objective: str) -> None:
    """ConfigError naming every key the user SET (in the YAML or on the command line: the
    keys of ``raw``, before defaults are filled in) that ``objective`` does not read: a key
    of :data:`OBJECTIVE_ONLY_KEYS` meant for another objective, or a key of the other
    objective's section. Defaults are never refused; a saved ``config.yaml`` (every key
    written) is read with :func:`config_from_dict`, which does not call this."""
    problems = []
    for key in flatten(raw):
        only = OBJECTIVE_ONLY_KEYS.get(key)
        section = key.split(".", 1)[0]
        if only is not None and only[0] != objective:
            problems.append(f"{key} ({only[1]})")
        elif section in OBJECTIVE_SECTIONS and section != objective:
            problems.append(f"{key} (the {section} section is read only with objective={section}; "
                            f"objective={objective} reads the {objective}.* keys)")
    if problems:
        raise ConfigError(
            f"objective={objective} does not read these keys that are set in the config or the overrides: "
            f"{'; '.join(problems)}. Remove them (a preset of the other objective sets them: start from a "
            f"configs/{objective}_*.yaml preset), or choose the objective they belong to"
        )


def config_from_dict(d: dict[str, Any]) -> Config:
    cfg = build(Config, d)
    cfg.validate()
    return cfg


def saved_dict(cfg: Config) -> dict[str, Any]:
    """The config as a run writes it (``config.yaml``, ``export.json``): lists for tuples, and
    every credential that reached a value (an expanded ``$HF_TOKEN`` inside a ``pipe:`` URL,
    the value of a secret-named environment variable, a URL password) redacted, as in W&B
    and metrics.jsonl (issue 15 item 8; :mod:`pipeline.track.secrets`)."""
    from pipeline.track.secrets import Scrubber

    return Scrubber().value(_plain(cfg.to_dict()))


def redacted_keys(cfg: Config) -> list[str]:
    """The dotted keys whose values :func:`saved_dict` redacts (the CLI names them)."""
    saved = flatten(saved_dict(cfg))
    return [k for k, v in flatten(_plain(cfg.to_dict())).items() if saved[k] != v]


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(saved_dict(cfg), sort_keys=False))


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as save_config writes it (lists for tuples, credentials redacted), flattened
    to dotted keys: compared with a saved config.yaml, a redacted value is no change."""
    return flatten(saved_dict(cfg))


def read_saved_config(path: str | Path) -> dict[str, Any]:
    """A ``config.yaml`` written by :func:`save_config`, flattened to dotted keys, with today's
    defaults filled in (so a key added since is not a change); as written, where it no longer
    builds (a key since removed or renamed)."""
    raw = yaml_load(Path(path).read_text()) or {}
    try:
        return flat_config(build(Config, raw))
    except ConfigError:
        return flatten(raw)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
