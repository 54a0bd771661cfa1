"""The objective registry: ``objective: <name>`` in a config -> the phases of that objective.

Adding an objective is a package under ``pipeline/objectives/`` (its config section, its
:class:`~pipeline.objectives.base.Objective` modules, a ``build_phases``) and one entry here.
Each builder imports its package only when chosen, so a run of one objective never imports
the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.data.meta import DataMeta
    from pipeline.train.phases import Phase


def _vdm(cfg: "Config", meta: "DataMeta") -> "list[Phase]":
    from pipeline.objectives.vdm.model import build_phases

    return build_phases(cfg.vdm, meta, lr=cfg.train.lr, betas=cfg.train.betas)


def _gan(cfg: "Config", meta: "DataMeta") -> "list[Phase]":
    from pipeline.objectives.gan.phases import build_phases

    return build_phases(cfg.gan, meta, betas=cfg.train.betas)


OBJECTIVES: dict[str, Callable[["Config", "DataMeta"], "list[Phase]"]] = {"vdm": _vdm, "gan": _gan}


def build_phases(cfg: "Config", meta: "DataMeta") -> "list[Phase]":
    """The phases of the configured objective; exactly one of them has ``ema=True``."""
    assert cfg.objective in OBJECTIVES, cfg.objective  # Config.validate names the allowed values
    phases = OBJECTIVES[cfg.objective](cfg, meta)
    assert sum(p.ema for p in phases) == 1, "exactly one phase holds the model that is sampled"
    return phases


def check_data(cfg: "Config", meta: "DataMeta") -> None:
    """ConfigError when the configured objective cannot be trained on data described by
    ``meta``. Torch-free (the objectives' config modules): the CLI calls it before any
    process group starts or anything is written to the run directory."""
    getattr(cfg, cfg.objective).check_data(meta)  # the objective's own section (Config has one per objective)


def reads_labels(cfg: "Config", meta: "DataMeta") -> bool:
    """Whether the configured objective trains on each sample's label of data described by ``meta``."""
    return getattr(cfg, cfg.objective).reads_labels(meta)


def inert_settings(cfg: "Config", meta: "DataMeta") -> dict[str, str]:
    """The keys of the objective's section that do not act on the model built for data
    described by ``meta`` (e.g. the MLP's widths under the UNet), each with why. Torch-free."""
    return getattr(cfg, cfg.objective).inert_keys(meta)


def data_warnings(cfg: "Config", meta: "DataMeta") -> list[str]:
    """Named warnings for settings that train on data described by ``meta`` but are known to
    go wrong (e.g. a VDM's MLP narrower than the samples without a skip). Torch-free."""
    return getattr(cfg, cfg.objective).data_warnings(meta)


def set_inert_settings(cfg: "Config", meta: "DataMeta") -> list[str]:
    """A named warning for each key of :func:`inert_settings` set to other than its default
    (a preset or an override that sets it expects it to act; non-negotiable: a key that does
    not apply is never silent)."""
    section = getattr(cfg, cfg.objective)
    defaults = type(section)()
    out = []
    for key, why in inert_settings(cfg, meta).items():
        name = key.split(".", 1)[1]
        if getattr(section, name) != getattr(defaults, name):
            out.append(f"{key}={getattr(section, name)!r} does not apply and is not used: {why}")
    return out
